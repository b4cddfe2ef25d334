"""bf16 end to end, as BLOOM trained: DeepSpeed's BF16_Optimizer (ZeRO-1) with fp32 master weights
and fp32 gradient accumulation, losses that track fp32, non-finite steps skipped and counted, a
diverging run stopped with a message. Shapes are tiny so this is fast where bf16 is emulated."""

from __future__ import annotations

import math
import os
import sys

import pytest
import yaml

from conftest import REPO
from launch import run_command, run_ranks
from megatron.config import config_from_dict
from megatron.training.logging import read_metrics
from training_utils import poisoned_worker, tiny_run, train_losses

pytestmark = pytest.mark.distributed
STEPS = 20


def inspecting_worker(rank: int, body: dict) -> dict:
    """Train; report the optimizer's precision facts from inside the run."""
    import torch

    from megatron.training.pretrain import pretrain

    facts = {}

    def inspect(engine, parallel):
        optimizer = engine.optimizer
        facts["optimizer"] = type(optimizer).__name__
        facts["model_dtypes"] = sorted({str(p.dtype) for p in engine.module.parameters()})
        if facts["optimizer"] == "BF16_Optimizer":
            facts["master_dtypes"] = sorted({str(t.dtype) for t in optimizer.fp32_groups_flat_partition})
            facts["accumulation_dtypes"] = sorted({str(t.dtype) for t in optimizer.fp32_groups_gradients_flat})
            # The master copy is what the optimizer steps: its parameters are the fp32 partitions.
            stepped = [p for group in optimizer.optimizer.param_groups for p in group["params"]]
            facts["stepped_dtypes"] = sorted({str(p.dtype) for p in stepped})
            facts["master_is_not_rounded"] = any(
                not torch.equal(master, master.to(torch.bfloat16).float()) for master in optimizer.fp32_groups_flat_partition)

    pretrain(config_from_dict(body), on_finish=inspect)
    return facts


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    results = {}
    for precision in ("fp32", "bf16"):
        tmp = tmp_path_factory.mktemp(precision)
        body = tiny_run(tmp, corpus, training={"train_iters": STEPS, "bf16": precision == "bf16"},
                        logging={"eval_interval": 0})
        (facts,) = run_ranks(inspecting_worker, 1, (body,))
        results[precision] = (train_losses(tmp / "run"), facts)
    return results


def test_bf16_losses_track_fp32_but_are_not_fp32(runs):
    fp32, _ = runs["fp32"]
    bf16, _ = runs["bf16"]
    assert len(fp32) == len(bf16) == STEPS
    worst = max(abs(b - f) / abs(f) for b, f in zip(bf16, fp32))
    assert worst <= 0.02, (worst, bf16, fp32)
    assert bf16 != fp32  # bf16 arithmetic really ran


def test_bf16_keeps_fp32_master_weights_and_fp32_gradient_accumulation(runs):
    _, facts = runs["bf16"]
    assert facts["optimizer"] == "BF16_Optimizer"
    assert facts["model_dtypes"] == ["torch.bfloat16"]
    assert facts["master_dtypes"] == facts["accumulation_dtypes"] == facts["stepped_dtypes"] == ["torch.float32"]
    assert facts["master_is_not_rounded"]  # updates smaller than bf16's resolution are kept


def test_a_poisoned_bf16_batch_is_skipped_and_counted(corpus, tmp_path):
    body = tiny_run(tmp_path, corpus, training={"train_iters": 6, "bf16": True}, logging={"eval_interval": 0})
    # global batch 8 / micro 2 = 4 micro-batches per step: call 10 is in step 3
    (result,) = run_ranks(poisoned_worker, 1, (body, [10]))
    assert result == {"skipped": 1, "iteration": 6}
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["skipped-iterations"] for r in records] == [0, 0, 1, 1, 1, 1]
    assert all(math.isfinite(r["lm loss"]) for r in records[3:])


def test_a_diverging_bf16_run_stops_with_the_message_and_no_traceback(corpus, tmp_path):
    body = tiny_run(tmp_path, corpus, training={"train_iters": 40, "bf16": True, "max_consecutive_skipped_steps": 3},
                    optimizer={"lr": 1.0e6, "min_lr": 0.0}, logging={"eval_interval": 0})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(body))
    result = run_command([sys.executable, "pretrain_bloom.py", "--config", str(config)], timeout=300, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: 4 consecutive steps had a non-finite loss or gradient" in result.stderr
    assert "training.max_consecutive_skipped_steps=3" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
