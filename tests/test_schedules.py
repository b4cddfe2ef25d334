"""Learning-rate schedule, batch-size ramp-up and FLOPs accounting against their formulas."""

from __future__ import annotations

import math

import pytest

from megatron.config import ModelConfig, OptimizerConfig, TrainingConfig
from megatron.training.metrics import throughput
from megatron.training.schedules import (
    BatchSizeRampup,
    LearningRateSchedule,
    total_train_iterations,
    total_train_samples,
)

BLOOM = OptimizerConfig(lr=6e-5, min_lr=6e-6, lr_decay_style="cosine", lr_warmup_samples=183_105,
                        lr_decay_samples=200_000_000)


def test_warmup_is_linear_in_samples():
    schedule = LearningRateSchedule.from_config(BLOOM, 220_000_000, 2048)
    assert schedule(0) == 0.0
    assert schedule(183_105 // 2) == pytest.approx(6e-5 * (183_105 // 2) / 183_105, rel=1e-12)
    assert schedule(183_105) == pytest.approx(6e-5, rel=1e-12)


@pytest.mark.parametrize("consumed", [183_106, 1_000_000, 50_000_000, 100_091_552, 150_000_000, 199_999_999])
def test_cosine_decay_matches_formula(consumed):
    schedule = LearningRateSchedule.from_config(BLOOM, 220_000_000, 2048)
    ratio = (consumed - 183_105) / (200_000_000 - 183_105)
    expected = 6e-6 + 0.5 * (math.cos(math.pi * ratio) + 1) * (6e-5 - 6e-6)
    assert schedule(consumed) == pytest.approx(expected, rel=1e-12)


def test_cosine_midpoint_and_floor():
    schedule = LearningRateSchedule.from_config(BLOOM, 220_000_000, 2048)
    midpoint = 183_105 + (200_000_000 - 183_105) / 2
    assert schedule(int(midpoint)) == pytest.approx((6e-5 + 6e-6) / 2, rel=1e-6)
    assert schedule(200_000_000) == pytest.approx(6e-6)
    assert schedule(215_000_000) == pytest.approx(6e-6)  # stays at min_lr after decay


def test_linear_and_constant_styles():
    linear = LearningRateSchedule(lr=1.0, min_lr=0.1, warmup_samples=10, decay=110, style="linear")
    assert linear(60) == pytest.approx(0.1 + 0.5 * 0.9)
    constant = LearningRateSchedule(lr=1.0, min_lr=0.1, warmup_samples=10, decay=110, style="constant")
    assert constant(5) == pytest.approx(0.5) and constant(100) == 1.0


def test_token_based_decay():
    opt = OptimizerConfig(lr=1.0, min_lr=0.0, lr_decay_style="linear", lr_warmup_samples=0, lr_decay_tokens=1000)
    schedule = LearningRateSchedule.from_config(opt, 100, 10)
    assert schedule(10, consumed_tokens=250) == pytest.approx(0.75)


def test_blooms_rampup():
    # 192 -> 2048 in steps of 16 over 9,765,625 samples: 116 increments of 84,186.4 samples each.
    ramp = BatchSizeRampup.from_config(TrainingConfig(global_batch_size=2048, micro_batch_size=2,
                                                      rampup_batch_size=[192, 16, 9_765_625]))
    per_increment = 9_765_625 / 116
    assert ramp(0) == 192
    assert ramp(int(per_increment) - 1) == 192
    assert ramp(int(per_increment) + 1) == 208
    assert ramp(int(50 * per_increment) + 1) == 192 + 50 * 16
    assert ramp(9_765_625) == 2048
    assert ramp(10**9) == 2048


def test_total_samples_from_iterations_with_rampup():
    training = TrainingConfig(global_batch_size=8, micro_batch_size=2, rampup_batch_size=[4, 2, 12], train_iters=5)
    # increments every 6 samples: 4 (0), 4 (4), 6 (8), 8 (14), 8 (22) -> 30
    assert total_train_samples(training, BatchSizeRampup.from_config(training)) == 30


def test_total_iterations_replay_the_rampup_over_train_samples():
    by_samples = TrainingConfig(global_batch_size=8, micro_batch_size=2, rampup_batch_size=[4, 2, 12],
                                train_samples=30, train_iters=None)
    # 4 + 4 + 6 + 8 + 8 = 30 samples in 5 steps; one more sample needs a sixth
    assert total_train_iterations(by_samples, BatchSizeRampup.from_config(by_samples)) == 5
    one_more = TrainingConfig(global_batch_size=8, micro_batch_size=2, rampup_batch_size=[4, 2, 12],
                              train_samples=31, train_iters=None)
    assert total_train_iterations(one_more, BatchSizeRampup.from_config(one_more)) == 6
    by_iterations = TrainingConfig(global_batch_size=8, micro_batch_size=2, rampup_batch_size=[4, 2, 12], train_iters=5)
    assert total_train_iterations(by_iterations, BatchSizeRampup.from_config(by_iterations)) == 5


def test_flops_match_bloom_176b_logged_figure():
    """BLOOM-176B's training log (TP4 PP12 DP8 on 384 A100s, global batch 2048, sequence 2048,
    activation checkpointing) reported 149.02 TFLOP/s per GPU at 105.22 s per iteration."""
    model = ModelConfig(num_layers=70, hidden_size=14336, num_attention_heads=112, seq_length=2048)
    stats = throughput(model, 250880, 2048, seconds=105.22, world_size=384, recompute=True,
                       peak_flops_per_device=312e12)
    assert round(stats["hardware-tflops-per-device"], 2) == 149.02
    # Model FLOPs leave out the recomputed forward: 3 of the 4 passes.
    assert stats["tflops-per-device"] == pytest.approx(149.02 * 3 / 4, rel=1e-4)
    assert stats["mfu"] == pytest.approx(149.02 * 3 / 4 / 312, rel=1e-4)
