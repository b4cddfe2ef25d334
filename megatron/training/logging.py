"""Where metrics go: TensorBoard (BLOOM's tags), ``metrics.jsonl`` and the console.

Only rank 0 writes. ``metrics.jsonl`` holds one JSON object per logged step or evaluation with
floats at full precision (``json`` writes the shortest repr that reads back bit-equal), so two
runs can be compared exactly and plotted with ``tools/plot_metrics.py``.

TensorBoard gets the tags of the Megatron-DeepSpeed code that trained BLOOM-176B
(bigscience-workshop/Megatron-DeepSpeed, ``megatron/training.py``: ``training_log`` and
``evaluate_and_print_results``), so a run opens next to BLOOM's published logs:
``lm-loss-training/lm loss`` with ``vs samples`` and ``vs tokens`` series,
``lm-loss-validation/{name}/lm loss validation`` (and ``... validation ppl``) per validation set,
``valid`` being the blend, ``learning-rate/learning-rate``, ``batch-size/batch-size``,
``grad-norm/grad-norm``, ``params-norm/params-norm``, ``loss-scale/loss-scale`` (fp16 only),
``iteration-time/...`` (time, samples and tokens per second, ``TFLOPs per gpu (estimated)``) and
the ``steps-vs-samples`` / ``steps-vs-tokens`` axes. Series BLOOM did not log keep our names
under their own group (``skipped-iterations/...``, ``throughput/...``, ``memory/...``).
The console line is Megatron-DeepSpeed's too. With ``logging.wandb_project`` set, Weights & Biases
gets the same tags (megatron/training/wandb_logger.py).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from tqdm import tqdm

if TYPE_CHECKING:
    from megatron.config import Config
    from megatron.training.trainer import StepResult


@dataclass(frozen=True)
class WandbSettings:
    """Where a run logs in Weights & Biases (``logging.wandb_*``), and the config it records."""

    project: Optional[str]
    exp_name: Optional[str] = None
    save_dir: Optional[str] = None
    run_config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Config) -> "WandbSettings":
        """The settings of ``cfg.logging``; the whole config is recorded with the run."""
        log = cfg.logging
        return cls(log.wandb_project, log.wandb_exp_name, log.wandb_save_dir, cfg.to_dict())


class MetricsLogger:
    """Writes scalars to TensorBoard, Weights & Biases and ``metrics.jsonl``; a no-op on ranks
    other than 0."""

    def __init__(self, run_dir: Optional[str], tensorboard_dir: Optional[str], rank: int,
                 wandb: Optional[WandbSettings] = None):
        self.enabled = rank == 0
        self._jsonl = None
        self._tensorboard = None
        self._wandb = None
        if not self.enabled:
            return
        if wandb is not None and wandb.project:
            from megatron.training.wandb_logger import WandbWriter

            self._wandb = WandbWriter(wandb.project, wandb.exp_name, wandb.save_dir or run_dir, wandb.run_config)
        if run_dir:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            # Append: a resumed run continues the same file; readers keep the last record per step.
            self._jsonl = open(Path(run_dir) / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=tensorboard_dir, max_queue=100)

    def log(self, step: int, scalars: dict[str, Any], kind: str = "train", samples: Optional[int] = None,
            tokens: Optional[int] = None) -> None:
        """Record ``scalars`` at ``step``; TensorBoard also gets them against consumed samples and
        tokens, under BLOOM's tags (see :func:`tensorboard_scalars`)."""
        if not self.enabled:
            return
        if self._tensorboard is not None or self._wandb is not None:
            tagged = tensorboard_scalars(kind, scalars, step, samples, tokens)
            if self._tensorboard is not None:
                for tag, value, x in tagged:
                    self._tensorboard.add_scalar(tag, value, x)
            if self._wandb is not None:
                self._wandb.log(step, tagged)
        if self._jsonl is not None:
            record = {"kind": kind, "step": step, **({"samples": samples} if samples is not None else {}), **scalars}
            self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
            self._jsonl.flush()

    def close(self) -> None:
        """Flush and close the writers."""
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.close()
        if self._jsonl is not None:
            self._jsonl.close()


# our metrics.jsonl name -> (BLOOM's TensorBoard tag, axes: i = iteration, s = samples, t = tokens)
_TRAIN_TAGS = {
    "lm loss": ("lm-loss-training/lm loss", "ist"),
    "learning-rate": ("learning-rate/learning-rate", "ist"),
    "batch-size": ("batch-size/batch-size", "is"),
    "grad-norm": ("grad-norm/grad-norm", "ist"),
    "params-norm": ("params-norm/params-norm", "ist"),
    "loss-scale": ("loss-scale/loss-scale", "ist"),
    "iteration-time": ("iteration-time/iteration-time", "ist"),
    "samples-per-second": ("iteration-time/samples per second", "i"),
    "samples-per-second-per-replica": ("iteration-time/samples per second per replica", "i"),
    "tokens-per-second": ("iteration-time/tokens per second", "i"),
    "tokens-per-second-per-replica": ("iteration-time/tokens per second per replica", "i"),
    # BLOOM logged the hardware count (recompute included) under this name.
    "hardware-tflops-per-device": ("iteration-time/TFLOPs per gpu (estimated)", "i"),
}
_SUFFIX = {"s": " vs samples", "t": " vs tokens"}


def tensorboard_scalars(kind: str, scalars: dict[str, Any], step: int, samples: Optional[int],
                        tokens: Optional[int]) -> list[tuple[str, float, int]]:
    """(tag, value, x) for TensorBoard: BLOOM's Megatron-DeepSpeed tags and axes, finite values only."""
    axes = {"i": step, "s": samples, "t": tokens}
    out: list[tuple[str, float, int]] = []

    def add(tag: str, value: Any, which: str) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            for axis in which:
                if axes[axis] is not None:
                    out.append((tag + _SUFFIX.get(axis, ""), float(value), int(axes[axis])))

    if kind == "valid":
        for name, value in scalars.items():
            # "validation loss" is the blend (Megatron-DeepSpeed's default set name: valid);
            # "validation/fr ppl" is one language's.
            head, _, measure = name.rpartition(" ")
            dataset = "valid" if head == "validation" else head.partition("/")[2]
            add(f"lm-loss-validation/{dataset}/lm loss validation" + (" ppl" if measure == "ppl" else ""), value, "ist")
        return out
    for name, value in scalars.items():
        if name in _TRAIN_TAGS:
            tag, which = _TRAIN_TAGS[name]
            add(tag, value, which)
        elif name != "consumed-tokens":
            default = "memory" if name.startswith("mem-") else name
            group = {"tflops-per-device": "throughput", "mfu": "throughput"}.get(name, default)
            add(f"{group}/{name}", value, "is")
    if samples is not None:
        out += [("steps-vs-samples/y=steps,x=samples", float(step), samples),
                ("steps-vs-samples/y=samples,x=steps", float(samples), step)]
    if tokens is not None:
        out += [("steps-vs-tokens/y=steps,x=tokens", float(step), tokens),
                ("steps-vs-tokens/y=tokens,x=steps", float(tokens), step)]
    return out


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


def train_scalars(window: Sequence[StepResult], seconds: float, skipped_iterations: int, consumed_tokens: int,
                  speed: dict[str, float], data_parallel_size: int) -> dict[str, Any]:
    """The steps since the last log line under Megatron-DeepSpeed's names, in the order
    ``metrics.jsonl`` records them: the loss averaged over the steps that updated, the last step's
    learning rate, batch size and gradient norm, the run's skipped iterations and tokens, seconds
    per trained iteration, then ``speed`` (megatron.training.metrics.throughput over ``seconds``)
    and its share per data-parallel replica."""
    losses = [step.loss for step in window if not step.skipped]
    norms = [step.grad_norm for step in window if step.grad_norm is not None]
    trained = sum(1 for step in window if not step.data_skipped)
    scalars = {
        "lm loss": sum(losses) / len(losses) if losses else float("nan"),
        "learning-rate": window[-1].learning_rate,
        "batch-size": window[-1].batch_size,
        "grad-norm": norms[-1] if norms else None,
        "skipped-iterations": skipped_iterations,
        "consumed-tokens": consumed_tokens,
        "iteration-time": seconds / max(trained, 1),
        **speed,
    }
    scalars["samples-per-second-per-replica"] = speed["samples-per-second"] / data_parallel_size
    scalars["tokens-per-second-per-replica"] = speed["tokens-per-second"] / data_parallel_size
    return scalars


def valid_scalars(losses: dict[str, float]) -> dict[str, float]:
    """Validation losses by set ("overall": the blend) under our names, each with its perplexity:
    ``validation loss``, ``validation ppl``, ``validation/{language} loss``, ..."""
    scalars = {}
    for name, loss in losses.items():
        key = "validation" if name == "overall" else f"validation/{name}"
        scalars[f"{key} loss"] = loss
        scalars[f"{key} ppl"] = math.exp(min(loss, 20.0))  # Megatron's cap: an untrained model's is astronomical
    return scalars


def format_valid_line(step: int, scalars: dict[str, float], evaluated_languages: int, languages: int) -> str:
    """One console line per evaluation: the blend's loss and perplexity, and how many languages
    of how many were evaluated (``logging.eval_languages_per_interval`` rotates them)."""
    return (f"validation at iteration {step}: loss {scalars['validation loss']:.4f}, "
            f"ppl {scalars['validation ppl']:.2f} (blend; {evaluated_languages} of {languages} languages evaluated)")


def format_valid_table(scalars: dict[str, float]) -> str:
    """Every validation set of :func:`valid_scalars`, one line each: the blend first, then the
    languages (what an evaluation-only run prints)."""
    rows = [(key.removesuffix(" loss").removeprefix("validation/").replace("validation", "blend"), value,
             scalars[key.removesuffix(" loss") + " ppl"]) for key, value in scalars.items() if key.endswith(" loss")]
    width = max(len(name) for name, _, _ in rows)
    return "\n".join([f"{'set'.ljust(width)}  {'loss':>8}  {'ppl':>10}"] +
                     [f"{name.ljust(width)}  {loss:8.4f}  {ppl:10.3f}" for name, loss, ppl in rows])


def format_train_line(step: int, total_steps: int, scalars: dict[str, Any], consumed_samples: int,
                      consumed_tokens: int) -> str:
    """One console line in Megatron-DeepSpeed's format (BLOOM's logs), plus MFU when known."""
    parts = [f" iteration {step:8d}/{total_steps:8d}", f" consumed samples: {consumed_samples:12d}",
             f" consumed tokens: {consumed_tokens:12d}"]
    fields = [("iteration-time", " elapsed time per iteration (s): {:.2f}"),
              ("learning-rate", " learning rate: {:.3E}"),
              ("batch-size", " global batch size: {:5d}"), ("lm loss", " lm loss: {:.6E}"),
              ("loss-scale", " loss scale: {:.1f}"), ("grad-norm", " grad norm: {:.3f}"),
              ("params-norm", " params norm: {:.3f}"), ("skipped-iterations", " number of skipped iterations: {:3d}"),
              ("samples-per-second", " samples per second: {:.3f}"),
              ("hardware-tflops-per-device", " TFLOPs: {:.2f}"), ("mfu", " MFU: {:.3f}")]
    for key, fmt in fields:
        if scalars.get(key) is not None:
            try:
                parts.append(fmt.format(scalars[key]))
            except (ValueError, TypeError):
                parts.append(f"{fmt.split(':')[0]}: {scalars[key]}")
    return " |".join(parts) + " |"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl``; for a step logged twice (a resumed run), the last wins."""
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                latest[(record["kind"], record["step"])] = record
    return sorted(latest.values(), key=lambda r: (r["step"], r["kind"]))
