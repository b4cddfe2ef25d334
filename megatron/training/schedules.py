"""Learning-rate schedule and batch-size ramp-up, both functions of how much data was seen.

BLOOM counted its schedule in samples, not steps, because the batch size ramps up: a step
early in the run holds fewer samples than one late in it. Both schedules here are pure
functions of consumed samples (or tokens), so a resumed run recomputes them exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megatron.config import OptimizerConfig, TrainingConfig


@dataclass(frozen=True)
class LearningRateSchedule:
    """Linear warmup from 0 to ``lr``, then constant, linear or cosine decay to ``min_lr``.

    ``unit`` is "samples" (BLOOM) or "tokens"; warmup is always counted in samples, decay in
    the chosen unit. After ``decay`` units the rate stays at ``min_lr``.
    """

    lr: float
    min_lr: float
    warmup_samples: int
    decay: int
    style: str
    unit: str = "samples"

    @classmethod
    def from_config(cls, opt: OptimizerConfig, train_samples: int, seq_length: int) -> "LearningRateSchedule":
        """Decay over ``lr_decay_samples`` / ``lr_decay_tokens``, or the whole run when neither is set."""
        if opt.lr_decay_tokens is not None:
            return cls(opt.lr, opt.min_lr, opt.lr_warmup_samples, opt.lr_decay_tokens, opt.lr_decay_style, "tokens")
        decay = opt.lr_decay_samples if opt.lr_decay_samples is not None else train_samples
        return cls(opt.lr, opt.min_lr, opt.lr_warmup_samples, decay, opt.lr_decay_style, "samples")

    def __call__(self, consumed_samples: int, consumed_tokens: Optional[int] = None) -> float:
        """The learning rate for the step that starts after ``consumed_samples``."""
        if self.warmup_samples > 0 and consumed_samples <= self.warmup_samples:
            return self.lr * consumed_samples / self.warmup_samples
        if self.style == "constant":
            return self.lr
        progress_units = consumed_tokens if self.unit == "tokens" else consumed_samples
        if progress_units is None:
            raise ValueError("a token-based schedule needs consumed_tokens")
        # Megatron measures decay from the end of warmup for sample schedules.
        start = self.warmup_samples if self.unit == "samples" else 0
        span = max(self.decay - start, 1)
        ratio = min(max((progress_units - start) / span, 0.0), 1.0)
        if self.style == "linear":
            coefficient = 1.0 - ratio
        else:
            coefficient = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coefficient * (self.lr - self.min_lr)


@dataclass(frozen=True)
class BatchSizeRampup:
    """BLOOM's batch-size ramp-up: from ``start``, add ``increment`` every ``ramp_samples /
    num_increments`` consumed samples, until ``global_batch_size`` (Megatron's rule)."""

    start: int
    increment: int
    ramp_samples: int
    global_batch_size: int

    @classmethod
    def from_config(cls, training: TrainingConfig) -> "BatchSizeRampup":
        """A ramp from the config, or a constant batch size when none is configured."""
        if training.rampup_batch_size is None:
            return cls(training.global_batch_size, 1, 0, training.global_batch_size)
        start, increment, ramp = training.rampup_batch_size
        return cls(start, increment, ramp, training.global_batch_size)

    def __call__(self, consumed_samples: int) -> int:
        """Global batch size of the step that starts after ``consumed_samples``."""
        if self.ramp_samples == 0 or self.start == self.global_batch_size:
            return self.global_batch_size
        num_increments = (self.global_batch_size - self.start) // self.increment
        samples_per_increment = self.ramp_samples / num_increments
        steps = int(consumed_samples / samples_per_increment)
        return min(self.start + steps * self.increment, self.global_batch_size)


def total_train_samples(training: TrainingConfig, rampup: BatchSizeRampup) -> int:
    """Samples in the whole run: ``train_samples``, or the sum over ``train_iters`` ramped steps."""
    if training.train_samples is not None:
        return training.train_samples
    consumed = 0
    for _ in range(training.train_iters or 0):
        consumed += rampup(consumed)
    return consumed


def total_train_iterations(training: TrainingConfig, rampup: BatchSizeRampup) -> int:
    """Iterations in the whole run: ``train_iters``, or the ramped steps that consume ``train_samples``."""
    if training.train_iters is not None:
        return training.train_iters
    target = total_train_samples(training, rampup)
    steps, consumed = 0, 0
    while consumed < target:
        consumed += rampup(consumed)
        steps += 1
    return steps
