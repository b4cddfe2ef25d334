#!/usr/bin/env python3
"""Checkpoint save and load: time per phase and size per kind of file, for the demo model.

    python bench/checkpoint_io.py                 # configs/tiny.yaml's shape, fp32 and bf16, best of 3

Builds the model, DeepSpeed engine and data the way ``pretrain`` does (one process, the demo's
shape: 6 layers, hidden 320, vocab 8192, about 10M parameters; synthetic data, so nothing needs
preprocessing), trains one step so Adam's state exists, then times:

* save: DeepSpeed's ``save_checkpoint`` (``mp_rank_00_model_states.pt`` with the client state,
  and the ZeRO optimizer shard), our layer files (``layer_XX-model_00``), and the commit
  (fsync of every file, manifest, rename, ``latest``), and ``Checkpointer.save`` end to end;
* load: finding and verifying the newest checkpoint (manifest sizes, zip structure), and
  ``engine.load_checkpoint`` into a fresh engine.

Loads are timed with the checkpoint in the page cache (just written: deserialisation only) and,
when the script may drop the cache (root), cold (read from disk). Results go to a table on
stdout and to ``bench/results/checkpoint_io.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from bench_record import drop_page_cache  # noqa: E402


def write_corpus(root: Path, vocab: int, languages=("en", "fr", "code")) -> list[dict]:
    """Three synthetic languages as ``.bin/.idx`` pairs (about 200k tokens each)."""
    from megatron.data.indexed_dataset import IndexedDatasetBuilder

    root.mkdir(parents=True, exist_ok=True)
    specs = []
    for seed, name in enumerate(languages):
        rng = np.random.default_rng(seed)
        prefix = root / f"{name}_text_document"
        with IndexedDatasetBuilder(f"{prefix}.bin", np.uint16) as builder:
            for _ in range(400):
                builder.add_document(np.append(rng.integers(1, vocab, int(rng.integers(200, 800))), 0))
            builder.finalize(f"{prefix}.idx")
        specs.append({"name": name, "prefix": str(prefix), "weight": 1.0})
    return specs


def demo_config(tmp: Path, bf16: bool):
    """configs/tiny.yaml's model and batch, on synthetic data, saving under ``tmp``."""
    import yaml

    from megatron.config import config_from_dict

    tiny = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    body = {"model": tiny["model"], "parallel": tiny["parallel"],
            "training": {**tiny["training"], "bf16": bf16, "train_samples": None, "train_iters": 10},
            "optimizer": tiny["optimizer"],
            "data": {"datasets": write_corpus(tmp / "data", tiny["model"]["vocab_size"]), "split": "0.95,0.05,0",
                     "num_workers": 0},
            "checkpoint": {"save": str(tmp / "checkpoints"), "load": str(tmp / "checkpoints"), "keep_last": 100},
            "logging": {"eval_interval": 0}}
    return config_from_dict(body)


def build(cfg, parallel, info):
    """Model and engine as pretrain builds them."""
    from megatron.training.engine import build_engine
    from megatron.training.pretrain import build_network
    from megatron.training.schedules import BatchSizeRampup

    model = build_network(cfg, parallel, info.device)
    return build_engine(cfg, model, parallel.dp_size, BatchSizeRampup.from_config(cfg.training)(0), mpu=parallel)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure(bf16: bool, repeats: int) -> dict:
    """Phase times (best of ``repeats``) and file sizes for one precision."""
    from megatron.checkpoint.checkpointing import Checkpointer
    from megatron.checkpoint.store import CheckpointStore, new_temporary_tag
    from megatron.core.distributed import init_distributed
    from megatron.core.parallel_state import ParallelState
    from megatron.model.bloom import count_parameters
    from megatron.training.data import build_training_data
    from megatron.training.pretrain import build_rng_tracker, set_seed
    from megatron.training.steps import EngineSteps

    tmp = Path(tempfile.mkdtemp(prefix="checkpoint-bench-"))
    cfg = demo_config(tmp, bf16)
    info = init_distributed()
    parallel = ParallelState(1, 0)
    set_seed(cfg.training.seed)
    tracker = build_rng_tracker(cfg, parallel, info.device)
    data = build_training_data(cfg, parallel)
    engine = build(cfg, parallel, info)
    params = count_parameters(engine.module)["total"]
    EngineSteps(engine, parallel, info.device).train(iter(data.train_loader(0)))  # Adam state exists
    checkpointer = Checkpointer(cfg, parallel, tracker)
    store = CheckpointStore(cfg.checkpoint.save)
    Path(cfg.checkpoint.save).mkdir(parents=True)
    times: dict[str, list[float]] = {}
    state = {"iteration": 1, "consumed_samples": 16, "consumed_tokens": 16 * 256}
    schedule = {"next_learning_rate": 0.0, "next_global_batch_size": 16}
    for i in range(repeats):
        tag, temporary = f"global_step{100 + i}", new_temporary_tag(f"global_step{100 + i}")
        state["iteration"] = 100 + i
        client = checkpointer._client_state(state, schedule)
        # Each phase runs in this iteration, so binding the loop's names as defaults is only for clarity.
        phases = {
            "save: DeepSpeed save_checkpoint": lambda temporary=temporary, client=client: engine.save_checkpoint(
                cfg.checkpoint.save, tag=temporary, client_state=client, save_latest=False),
            "save: layer files": lambda temporary=temporary: checkpointer._write_layer_files(
                engine, Path(cfg.checkpoint.save) / temporary),
            "save: commit (fsync, manifest, rename, latest)": lambda temporary=temporary, tag=tag: store.commit(
                temporary, tag, {"layout": checkpointer.layout()}),
        }
        os.sync()  # no write-back of the previous save running underneath this one
        for name, fn in phases.items():
            times.setdefault(name, []).append(timed(fn)[0])
        state["iteration"] = 200 + i
        os.sync()
        times.setdefault("save: Checkpointer.save, end to end", []).append(
            timed(lambda: checkpointer.save(engine, dict(state), schedule))[0])
    fresh = build(cfg, parallel, info)
    cold = drop_page_cache()
    for cache in (["warm", "cold"] if cold else ["warm"]):
        for _ in range(repeats):
            if cache == "cold":
                drop_page_cache()
            seconds, resume = timed(checkpointer.find_resume_point)
            times.setdefault(f"load ({cache} cache): find and verify the newest checkpoint", []).append(seconds)
            times.setdefault(f"load ({cache} cache): engine.load_checkpoint", []).append(
                timed(lambda resume=resume: checkpointer.load(fresh, resume))[0])
    for a, b in zip(engine.module.parameters(), fresh.module.parameters()):
        assert a.detach().equal(b.detach()), "the loaded weights differ from the saved ones"
    files = json.loads((store.directory / resume.tag / "manifest.json").read_text())["files"]
    sizes: dict[str, int] = {}
    for name, size in files.items():
        kind = ("layer files (model, by pipeline layer)" if name.startswith("layer_") else
                "mp_rank_00_model_states.pt (model + client state)" if name.startswith("mp_rank") else
                "ZeRO optimizer shard (fp32 master + Adam moments)" if "optim_states" in name else name)
        sizes[kind] = sizes.get(kind, 0) + size
    return {"precision": "bf16" if bf16 else "fp32", "parameters": params,
            "seconds_best": {k: min(v) for k, v in times.items()},
            "seconds_median": {k: statistics.median(v) for k, v in times.items()},
            "bytes": sizes, "total_bytes": sum(sizes.values())}


def main(argv=None) -> int:
    """Measure each precision in a fresh process (DeepSpeed's state is per process)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", choices=["fp32", "bf16"], nargs="*", default=["fp32", "bf16"])
    parser.add_argument("--one", choices=["fp32", "bf16"], help=argparse.SUPPRESS)  # child process mode
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "checkpoint_io.json"))
    args = parser.parse_args(argv)
    if args.one:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        print("RESULT " + json.dumps(measure(args.one == "bf16", args.repeats)), flush=True)
        return 0
    import subprocess

    results = []
    for precision in args.precision:
        out = subprocess.run([sys.executable, __file__, "--one", precision, "--repeats", str(args.repeats)],
                             capture_output=True, text=True, check=True).stdout
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    for r in results:
        print(f"\n{r['precision']}, {r['parameters']:,} parameters, {r['total_bytes'] / 1e6:.1f} MB per checkpoint")
        for name, seconds in r["seconds_best"].items():
            print(f"  {name:<52s} {seconds * 1000:8.1f} ms (median {r['seconds_median'][name] * 1000:.1f})")
        for kind, size in sorted(r["bytes"].items(), key=lambda kv: -kv[1]):
            print(f"  {kind:<52s} {size / 1e6:8.2f} MB")
    import torch

    command = ["bench/checkpoint_io.py", *(argv or sys.argv[1:])]
    record = {"command": "python " + " ".join(shlex.quote(a) for a in command),
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "torch": torch.__version__},
              "results": results}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
