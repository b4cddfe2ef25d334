"""TensorBoard as BLOOM's Megatron-DeepSpeed wrote it: the tags BLOOM-176B's published logs use,
read back with TensorBoard's own reader, with the values of metrics.jsonl (float32 in events)."""

from __future__ import annotations

import numpy as np
import pytest

from launch import run_ranks
from megatron.config import config_from_dict
from megatron.training.logging import read_metrics
from training_utils import tiny_run

pytestmark = pytest.mark.distributed


def worker(rank: int, body: dict) -> None:
    from megatron.training.pretrain import pretrain

    pretrain(config_from_dict(body))


@pytest.fixture(scope="module")
def logged(corpus, tmp_path_factory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp = tmp_path_factory.mktemp("tb")
    body = tiny_run(tmp, corpus, training={"train_iters": 4}, logging={"eval_interval": 2,
                                                                       "tensorboard_dir": str(tmp / "tb")})
    run_ranks(worker, 1, (body,))
    events = EventAccumulator(str(tmp / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return scalars, read_metrics(tmp / "run" / "metrics.jsonl")


BLOOM_TRAINING_TAGS = [
    "lm-loss-training/lm loss", "lm-loss-training/lm loss vs samples", "lm-loss-training/lm loss vs tokens",
    "learning-rate/learning-rate", "learning-rate/learning-rate vs samples", "learning-rate/learning-rate vs tokens",
    "batch-size/batch-size", "batch-size/batch-size vs samples",
    "grad-norm/grad-norm", "grad-norm/grad-norm vs samples", "grad-norm/grad-norm vs tokens",
    "iteration-time/iteration-time", "iteration-time/iteration-time vs samples", "iteration-time/iteration-time vs tokens",
    "iteration-time/samples per second", "iteration-time/samples per second per replica",
    "iteration-time/tokens per second", "iteration-time/tokens per second per replica",
    "iteration-time/TFLOPs per gpu (estimated)",
    "steps-vs-samples/y=steps,x=samples", "steps-vs-samples/y=samples,x=steps",
    "steps-vs-tokens/y=steps,x=tokens", "steps-vs-tokens/y=tokens,x=steps",
]


def test_training_tags_are_blooms(logged):
    scalars, _ = logged
    missing = [tag for tag in BLOOM_TRAINING_TAGS if tag not in scalars]
    assert not missing, (missing, sorted(scalars))
    assert "loss-scale/loss-scale" not in scalars  # fp16 only, as in Megatron-DeepSpeed


def test_validation_tags_name_each_set(logged):
    scalars, _ = logged
    for name in ("valid", "fr", "sw", "python"):  # valid: the blend, Megatron-DeepSpeed's default name
        for suffix in ("", " vs samples", " vs tokens", " ppl", " ppl vs samples", " ppl vs tokens"):
            assert f"lm-loss-validation/{name}/lm loss validation{suffix}" in scalars, (name, suffix)


def test_values_and_axes_equal_metrics_jsonl(logged):
    scalars, records = logged
    train = [r for r in records if r["kind"] == "train"]
    valid = [r for r in records if r["kind"] == "valid"]
    f32 = lambda v: float(np.float32(v))  # noqa: E731 - TensorBoard stores float32
    assert scalars["lm-loss-training/lm loss"] == [(r["step"], f32(r["lm loss"])) for r in train]
    assert scalars["lm-loss-training/lm loss vs samples"] == [(r["samples"], f32(r["lm loss"])) for r in train]
    assert scalars["lm-loss-training/lm loss vs tokens"] == [(r["consumed-tokens"], f32(r["lm loss"])) for r in train]
    assert scalars["iteration-time/TFLOPs per gpu (estimated)"] == [
        (r["step"], f32(r["hardware-tflops-per-device"])) for r in train]
    assert scalars["lm-loss-validation/valid/lm loss validation"] == [
        (r["step"], f32(r["validation loss"])) for r in valid]
    assert scalars["lm-loss-validation/sw/lm loss validation ppl"] == [
        (r["step"], f32(r["validation/sw ppl"])) for r in valid]
