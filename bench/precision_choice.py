#!/usr/bin/env python
"""What ``training.bf16: auto`` buys on this CPU: an explicit ``bf16: true`` run against the
automatic choice, on the same config, data and steps.

    python bench/precision_choice.py                  # configs/tiny.yaml, 3 steps each
    python bench/precision_choice.py --steps 5

Two measurements, both in this run, on this machine:

1. the matrix product that tells native from emulated bf16: 2048x512 @ 512x2048, fp32 and bf16
   (best of 3; where bf16 is emulated it takes seconds instead of tens of milliseconds);
2. ``pretrain_bloom.py --config configs/tiny.yaml`` for ``--steps`` steps, once with
   ``training.bf16=auto`` and once with ``training.bf16=true``, evaluation and checkpoints off;
   the per-step time is read from each run's ``metrics.jsonl`` (the first step, which includes
   warm-up, is reported apart).

Needs the demo data (``bash scripts/demo.sh`` builds it). Writes
``bench/results/precision_choice.json`` with the machine's CPU capability and bf16 probes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron.training.logging import read_metrics  # noqa: E402
from megatron.training.precision import CpuBf16Support, choose_precision  # noqa: E402


def matmul_seconds(dtype: torch.dtype, repeats: int = 3) -> float:
    """Best-of-``repeats`` time of the 2048x512 @ 512x2048 product in ``dtype``."""
    a, b = torch.randn(2048, 512).to(dtype), torch.randn(512, 2048).to(dtype)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def run(bf16: str, steps: int, tmp: Path) -> dict:
    """One training run; its per-step times from metrics.jsonl and its wall time."""
    run_dir = tmp / f"bf16-{bf16}"
    sets = [f"training.bf16={bf16}", f"training.train_iters={steps}", "training.train_samples=null",
            "logging.log_interval=1", "logging.eval_interval=0", f"logging.run_dir={run_dir}",
            "logging.tensorboard_dir=null", "logging.sample_prompts=[]", "checkpoint.save=null", "checkpoint.load=null"]
    command = [sys.executable, "pretrain_bloom.py", "--config", "configs/tiny.yaml"]
    for item in sets:
        command += ["--set", item]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"run with training.bf16={bf16} failed:\n{done.stderr[-3000:]}")
    times = [r["iteration-time"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    precision = next((line.split("precision: ", 1)[1] for line in done.stderr.splitlines() if "precision: " in line),
                     "")
    return {"training.bf16": bf16, "precision": precision, "first_step_s": times[0],
            "later_steps_s": sum(times[1:]) / max(len(times) - 1, 1), "wall_s": wall}


def main() -> None:
    """Measure, print a table, write bench/results/precision_choice.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="training steps per run (default 3)")
    args = parser.parse_args()
    cpu = CpuBf16Support.detect()
    print(f"{cpu.describe()}; auto picks {choose_precision('auto', False, torch.device('cpu'), cpu=cpu).name}")
    matmul = {"fp32_s": matmul_seconds(torch.float32), "bf16_s": matmul_seconds(torch.bfloat16)}
    print(f"2048x512 @ 512x2048: fp32 {matmul['fp32_s'] * 1e3:.1f} ms, bf16 {matmul['bf16_s'] * 1e3:.1f} ms "
          f"({matmul['bf16_s'] / matmul['fp32_s']:.0f}x)")
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run(choice, args.steps, Path(tmp)) for choice in ("auto", "true")]
    print(f"{'training.bf16':>13}  {'precision':<60}  {'first step':>10}  {'later steps':>11}  {'wall':>7}")
    for r in runs:
        print(f"{r['training.bf16']:>13}  {r['precision'][:60]:<60}  {r['first_step_s']:>9.2f}s  "
              f"{r['later_steps_s']:>10.2f}s  {r['wall_s']:>6.1f}s")
    result = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "machine": platform.processor()
              or platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "cpu": {"capability": cpu.capability, "avx512_bf16": cpu.avx512_bf16, "amx_tile": cpu.amx_tile},
              "threads": torch.get_num_threads(), "matmul_2048x512x2048": matmul, "steps": args.steps, "runs": runs}
    out = ROOT / "bench" / "results" / "precision_choice.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
