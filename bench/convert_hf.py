#!/usr/bin/env python
"""Time and peak memory of tools/convert_to_hf.py and tools/convert_from_hf.py.

    python bench/convert_hf.py                          # configs/tiny.yaml and the 560m shape, TP 1 and 2
    python bench/convert_hf.py --shapes 560m --tp 4 --dtype bf16

For each model shape (a config under configs/), a model with random weights is written as
layer files at each TP size of ``--tp`` (in a separate process, which is not measured), then the export
and the import each run as their own process, exactly as a user runs them; the wall time and
that process's peak resident memory (``os.wait4``'s ``ru_maxrss``) are recorded. A process that
only imports the converter gives the interpreter's own footprint, so "peak minus baseline" is
the memory the conversion itself needed; the streaming design keeps it near the size of the
largest layer (the embedding), not the model. Results go to bench/results/convert_hf.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"tiny": ROOT / "configs" / "tiny.yaml", "560m": ROOT / "configs" / "bloom-560m.yaml"}


def run_measured(command: list[str]) -> tuple[float, float, str]:
    """Run ``command``; return (seconds, peak RSS in MiB of that process, combined output)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, HF_HUB_OFFLINE="1"))
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{output[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, output


def make_checkpoint(config: str, root: str, tp: int, dtype: str) -> None:
    """(Helper process) a random model of ``config``'s shape as layer files at TP ``tp``, plus config.yaml."""
    sys.path.insert(0, str(ROOT))
    import torch

    from megatron.checkpoint.layer_files import write_layer_file
    from megatron.checkpoint.resharding import split_full
    from megatron.checkpoint.store import write_latest
    from megatron.config import load_config, save_config
    from megatron.convert.hf_files import parse_dtype
    from megatron.model.bloom import build_model
    from megatron.model.layout import module_key_to_layer

    cfg = load_config(config, overrides=[f"parallel.tensor_model_parallel_size={tp}"])
    target = parse_dtype(dtype) or torch.float32
    model = build_model(cfg.model, cfg.padded_vocab_size, device="meta")
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    generator = torch.Generator().manual_seed(0)
    for name, param in model.state_dict().items():
        index, key = module_key_to_layer(name, cfg.model.num_layers)
        by_layer.setdefault(index, {})[key] = (torch.randn(param.shape, generator=generator) * 0.02).to(target)
    out = Path(root) / "global_step1"
    out.mkdir(parents=True)
    for index, tensors in by_layer.items():
        for rank in range(tp):
            write_layer_file(out, index, rank, {k: split_full(k, t, rank, tp) for k, t in tensors.items()})
        del tensors
    write_latest(root, "global_step1")
    save_config(cfg, Path(root) / "config.yaml")


def _reported_seconds(log: str) -> float:
    """The conversion time a tool prints ("... in 12.3 s"), without interpreter start-up."""
    match = re.search(r" in (\d+(?:\.\d+)?) s", log)
    return float(match.group(1)) if match else float("nan")


def bench_shape(name: str, config: Path, tp: int, dtype: str, work: Path) -> dict:
    """Write the checkpoint, then measure export and import; returns the numbers."""
    ckpt, hf, back = work / f"{name}-ckpt", work / f"{name}-hf", work / f"{name}-import"
    for path in (ckpt, hf, back):
        shutil.rmtree(path, ignore_errors=True)
    subprocess.run([sys.executable, __file__, "--make-checkpoint", str(config), str(ckpt), str(tp), dtype],
                   check=True, cwd=ROOT)
    os.sync()  # write back the new files first, so their I/O is not counted in the export
    layer_bytes = sum(p.stat().st_size for p in (ckpt / "global_step1").iterdir())
    largest = max(p.stat().st_size for p in (ckpt / "global_step1").iterdir())
    export_s, export_mib, export_log = run_measured([sys.executable, "tools/convert_to_hf.py", "--checkpoint",
                                                     str(ckpt), "--output", str(hf), "--quiet"])
    os.sync()
    import_s, import_mib, import_log = run_measured([sys.executable, "tools/convert_from_hf.py", "--hf", str(hf),
                                            "--output", str(back), "--tp", str(tp), "--quiet"])
    hf_bytes = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
    result = {"shape": name, "config": str(config.relative_to(ROOT)), "tp": tp, "dtype": dtype,
              "checkpoint_bytes": layer_bytes, "largest_layer_file_bytes": largest, "safetensors_bytes": hf_bytes,
              "export_seconds": round(export_s, 2), "export_conversion_seconds": _reported_seconds(export_log),
              "export_peak_rss_mib": round(export_mib, 1),
              "import_seconds": round(import_s, 2), "import_conversion_seconds": _reported_seconds(import_log),
              "import_peak_rss_mib": round(import_mib, 1)}
    for path in (ckpt, hf, back):
        shutil.rmtree(path, ignore_errors=True)
    return result


def main(argv=None) -> int:
    """Measure every requested shape and print a table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2],
                        help="TP sizes of the checkpoint written and imported (default: 1 2)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of the checkpoint")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench/results/convert_hf.json")
    parser.add_argument("--make-checkpoint", nargs=4, metavar=("CONFIG", "ROOT", "TP", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make_checkpoint:
        config, root, tp, dtype = args.make_checkpoint
        make_checkpoint(config, root, int(tp), dtype)
        return 0

    work = args.workdir or Path(tempfile.mkdtemp(prefix="convert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    baseline_s, baseline_mib, _ = run_measured([sys.executable, "-c", "import sys; sys.path.insert(0, '.'); "
                                                "import megatron.convert.to_hf, megatron.convert.from_hf"])
    results = [bench_shape(name, SHAPES[name], tp, args.dtype, work) for name in args.shapes for tp in args.tp]
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)

    print(f"baseline (interpreter + imports): {baseline_mib:.0f} MiB, {baseline_s:.1f} s")
    print("| shape | TP | dtype | weights | largest layer file | export s (process) | export peak MiB "
          "| import s (process) | import peak MiB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['shape']} | {r['tp']} | {r['dtype']} | {r['safetensors_bytes'] / 2**20:,.0f} MiB "
              f"| {r['largest_layer_file_bytes'] / 2**20:,.0f} MiB | {r['export_conversion_seconds']:.1f} "
              f"({r['export_seconds']:.1f}) | {r['export_peak_rss_mib']:,.0f} | {r['import_conversion_seconds']:.1f} "
              f"({r['import_seconds']:.1f}) | {r['import_peak_rss_mib']:,.0f} |")
    import torch

    command = "python bench/convert_hf.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record = {"command": command.strip(),
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "torch": torch.__version__},
              "baseline_peak_rss_mib": round(baseline_mib, 1), "baseline_seconds": round(baseline_s, 2),
              "results": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
