"""The training loop on DeepSpeed: data-parallel equivalence, ZeRO stages, non-finite steps."""

from __future__ import annotations

import math

import pytest

from launch import run_ranks
from megatron.config import config_from_dict
from megatron.training.logging import read_metrics
from training_utils import poisoned_worker, tiny_run, train_losses

pytestmark = pytest.mark.distributed


def train_worker(rank: int, body: dict) -> dict:
    from megatron.training.pretrain import pretrain

    state = pretrain(config_from_dict(body))
    return {"iteration": state.iteration, "consumed": state.consumed_samples, "skipped": state.skipped_iterations}


@pytest.fixture(scope="module")
def single_rank_losses(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp1")
    (result,) = run_ranks(train_worker, 1, (tiny_run(tmp, corpus),))
    assert result == {"iteration": 10, "consumed": 80, "skipped": 0}
    return train_losses(tmp / "run"), read_metrics(tmp / "run" / "metrics.jsonl")


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_two_data_parallel_ranks_match_one(zero_stage, corpus, single_rank_losses, tmp_path):
    reference, _ = single_rank_losses
    body = tiny_run(tmp_path, corpus, parallel={"zero_stage": zero_stage})
    run_ranks(train_worker, 2, (body,))
    got = train_losses(tmp_path / "run")
    assert len(got) == len(reference) == 10
    assert max(abs(a - b) for a, b in zip(got, reference)) <= 1e-5, (got, reference)


def test_single_rank_run_is_bitwise_deterministic(corpus, single_rank_losses, tmp_path):
    reference, _ = single_rank_losses
    run_ranks(train_worker, 1, (tiny_run(tmp_path, corpus),))
    assert train_losses(tmp_path / "run") == reference


def test_metrics_have_the_logged_fields(single_rank_losses):
    reference, records = single_rank_losses
    train = [r for r in records if r["kind"] == "train"]
    for key in ("lm loss", "learning-rate", "batch-size", "grad-norm", "skipped-iterations", "samples-per-second",
                "tokens-per-second", "tflops-per-device", "consumed-tokens"):
        assert key in train[-1], key
    valid = [r for r in records if r["kind"] == "valid"]
    assert [r["step"] for r in valid] == [0, 5, 10]
    for lang in ("fr", "sw", "python"):
        assert math.isfinite(valid[-1][f"validation/{lang} loss"])
        assert valid[-1][f"validation/{lang} ppl"] == pytest.approx(math.exp(valid[-1][f"validation/{lang} loss"]))
    assert valid[-1]["validation loss"] < valid[0]["validation loss"]  # it learns
    assert reference[-1] < reference[0]


def test_rampup_changes_the_batch_size(corpus, tmp_path):
    body = tiny_run(tmp_path, corpus, training={"rampup_batch_size": [4, 2, 16], "train_iters": 8})
    (result,) = run_ranks(train_worker, 1, (body,))
    sizes = [r["batch-size"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    # +2 every 8 consumed samples: after 0, 4, 8, 14, 20, ... samples
    assert sizes == [4, 4, 6, 6, 8, 8, 8, 8]
    assert result["consumed"] == sum(sizes)


def test_a_poisoned_batch_is_skipped_and_counted(corpus, single_rank_losses, tmp_path):
    reference, _ = single_rank_losses
    body = tiny_run(tmp_path, corpus, training={"train_iters": 6}, logging={"eval_interval": 0})
    # global batch 8 / micro 2 = 4 micro-batches per step: call 10 is in step 3
    (result,) = run_ranks(poisoned_worker, 1, (body, [10]))
    assert result == {"skipped": 1, "iteration": 6}
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["skipped-iterations"] for r in records] == [0, 0, 1, 1, 1, 1]
    assert math.isnan(records[2]["lm loss"])
    assert records[:2] and [r["lm loss"] for r in records[:2]] == reference[:2]
    assert all(math.isfinite(r["lm loss"]) for r in records[3:])


def test_too_many_consecutive_skips_stop_the_run(corpus, tmp_path):
    body = tiny_run(tmp_path, corpus, training={"max_consecutive_skipped_steps": 2}, logging={"eval_interval": 0})
    (result,) = run_ranks(poisoned_worker, 1, (body, list(range(1, 100))))
    assert "3 consecutive steps had a non-finite loss" in result["error"]


def drifting_worker(rank: int, body: dict) -> dict:
    """TP=2: after step 2, rank 1's copy of a LayerNorm weight drifts away from rank 0's."""
    import torch

    import megatron.training.trainer as trainer_module
    from megatron.training.pretrain import pretrain

    original = trainer_module.Trainer.train_step

    def train_step(self):
        step = original(self)
        if self.state.iteration == 2 and self.parallel.tp_rank == 1:
            with torch.no_grad():
                self.engine.module.layers[1].post_attention_layernorm.weight.add_(1e-3)
        return step

    trainer_module.Trainer.train_step = train_step
    try:
        state = pretrain(config_from_dict(body))
        return {"iteration": state.iteration}
    except RuntimeError as exc:
        return {"error": str(exc)}


def test_tp_duplicates_drifting_apart_stop_the_run_with_their_names(corpus, tmp_path):
    body = tiny_run(tmp_path, corpus, parallel={"tensor_model_parallel_size": 2, "tp_sync_check_interval": 1},
                    training={"train_iters": 5}, logging={"eval_interval": 0})
    results = run_ranks(drifting_worker, 2, (body,))
    for result in results:
        assert "error" in result, result
        assert "tensor-parallel duplicated parameters differ across TP ranks at iteration 2" in result["error"]
        assert "layers.1.post_attention_layernorm.weight" in result["error"]
