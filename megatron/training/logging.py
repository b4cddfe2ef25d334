"""Where metrics go: TensorBoard (Megatron's scalar names), ``metrics.jsonl`` and the console.

Only rank 0 writes. ``metrics.jsonl`` holds one JSON object per logged step or evaluation with
floats at full precision (``json`` writes the shortest repr that reads back bit-equal), so two
runs can be compared exactly and plotted with ``tools/plot_metrics.py``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm


class MetricsLogger:
    """Writes scalars to TensorBoard and ``metrics.jsonl``; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Optional[str], tensorboard_dir: Optional[str], rank: int):
        self.enabled = rank == 0
        self._jsonl = None
        self._tensorboard = None
        if not self.enabled:
            return
        if run_dir:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            # Append: a resumed run continues the same file; readers keep the last record per step.
            self._jsonl = open(Path(run_dir) / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=tensorboard_dir, max_queue=100)

    def log(self, step: int, scalars: dict[str, Any], kind: str = "train", samples: Optional[int] = None) -> None:
        """Record ``scalars`` at ``step`` (and, for TensorBoard, also against consumed samples)."""
        if not self.enabled:
            return
        if self._tensorboard is not None:
            for name, value in scalars.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tensorboard.add_scalar(name, value, step)
                    if samples is not None:
                        self._tensorboard.add_scalar(f"{name} vs samples", value, samples)
        if self._jsonl is not None:
            record = {"kind": kind, "step": step, **({"samples": samples} if samples is not None else {}), **scalars}
            self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
            self._jsonl.flush()

    def close(self) -> None:
        """Flush and close the writers."""
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._jsonl is not None:
            self._jsonl.close()


def console(line: str) -> None:
    """Print one line for the user, now: above a progress bar on a terminal, and flushed at once
    when stdout is a file (a SLURM log, ``| tee``), where Python would otherwise hold it in a
    block buffer until the process ends."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


class ProgressLines:
    """Progress of a long loop as occasional console lines (``what: 12/59, 8 s``), for work that
    can take a while but is no training step: silent when it finishes within ``after`` seconds,
    then one line every ``every`` seconds. Works the same on a terminal and in a log file."""

    def __init__(self, what: str, total: int, enabled: bool = True, after: float = 5.0, every: float = 10.0):
        self.what, self.total, self.enabled = what, total, enabled
        self.after, self.every = after, every
        self.start = time.monotonic()
        self._next = self.start + after

    def update(self, done: int) -> None:
        """Report ``done`` of ``total`` if a report is due."""
        now = time.monotonic()
        if self.enabled and now >= self._next and done < self.total:
            console(f"{self.what}: {done}/{self.total}, {now - self.start:.0f} s")
            self._next = now + self.every


def format_train_line(step: int, total_steps: int, scalars: dict[str, Any]) -> str:
    """One console line in Megatron's style."""
    parts = [f"iteration {step:>7d}/{total_steps:>7d}"]
    keys = [("lm loss", "{:.6e}"), ("learning-rate", "{:.3e}"), ("batch-size", "{:d}"), ("grad-norm", "{:.3f}"),
            ("skipped-iterations", "{:d}"), ("tokens-per-second", "{:.0f}"), ("tflops-per-device", "{:.2f}"),
            ("mfu", "{:.3f}")]
    for key, fmt in keys:
        if key in scalars and scalars[key] is not None:
            value = scalars[key]
            try:
                parts.append(f"{key}: {fmt.format(value)}")
            except (ValueError, TypeError):
                parts.append(f"{key}: {value}")
    return " | ".join(parts)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl``; for a step logged twice (a resumed run), the last wins."""
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                latest[(record["kind"], record["step"])] = record
    return sorted(latest.values(), key=lambda r: (r["step"], r["kind"]))
