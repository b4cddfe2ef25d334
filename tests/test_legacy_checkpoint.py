"""A checkpoint written by an earlier version of this code (tests/fixtures/legacy_checkpoint,
made by commit 0261a20) still loads, and resumes bit for bit: the losses of iterations 4..6
equal those of that version's uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from conftest import fixture_maker

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_checkpoint"


def with_original_kernels(run: dict) -> dict:
    """The kernels the fixture was trained with: bit-exact continuation needs the same arithmetic
    (newer defaults, e.g. torch's fused AdamW, round differently)."""
    run["model"].update(attention_implementation="sdpa_mask", bias_gelu_fusion=False, bias_dropout_fusion=False)
    run["optimizer"]["adam_implementation"] = "torch_for_loop"
    return run


def test_legacy_checkpoint_resumes_bit_for_bit(tmp_path, corpus):
    body = fixture_maker(FIXTURE).body

    from megatron.config import config_from_dict
    from megatron.training.logging import read_metrics
    from megatron.training.pretrain import pretrain

    shutil.copytree(FIXTURE / "checkpoints", tmp_path / "resumed" / "checkpoints")
    state = pretrain(config_from_dict(with_original_kernels(body(tmp_path, corpus, "resumed"))))
    assert state.iteration == 6
    expected = {int(k): v for k, v in json.loads((FIXTURE / "losses.json").read_text()).items()}
    resumed = {r["step"]: r["lm loss"] for r in read_metrics(tmp_path / "resumed" / "run" / "metrics.jsonl")
               if r["kind"] == "train"}
    assert sorted(resumed) == [4, 5, 6]
    assert resumed == {step: expected[step] for step in (4, 5, 6)}  # exact float equality


def test_legacy_layer_files_load_into_the_model(tmp_path):
    body = fixture_maker(FIXTURE).body

    from megatron.checkpoint.layer_files import load_layer_files_into
    from megatron.config import config_from_dict
    from megatron.model.bloom import BloomForCausalLM

    cfg = config_from_dict(body(tmp_path, [{"name": "fr", "prefix": str(tmp_path / "unused")}], "x"))
    model = BloomForCausalLM(cfg.model, cfg.padded_vocab_size)
    report = load_layer_files_into(model, FIXTURE / "checkpoints")
    assert report["step"] == 3 and report["source_tp_size"] == 1
    engine_state = torch.load(FIXTURE / "checkpoints" / "global_step3" / "mp_rank_00_model_states.pt",
                              map_location="cpu", weights_only=False)["module"]
    loaded = model.state_dict()
    assert set(loaded) == set(engine_state)
    for name, tensor in engine_state.items():
        assert torch.equal(loaded[name], tensor.float()), name
