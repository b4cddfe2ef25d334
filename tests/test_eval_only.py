"""pretrain_bloom.py's evaluation-only mode (Megatron-DeepSpeed's --eval-only) on a real checkpoint
(tests/fixtures/legacy_checkpoint): it logs the run's validation sets at the checkpoint's
iteration, trains and saves nothing, and its losses are transformers' on the same samples."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import BloomForCausalLM

from conftest import fixture_maker

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_checkpoint"


@pytest.mark.slow  # a DeepSpeed engine and an export: ~20 s on two cores
def test_eval_only_logs_transformers_losses_and_saves_nothing(tmp_path, corpus, capsys):
    body = fixture_maker(FIXTURE).body

    from megatron.config import config_from_dict
    from megatron.convert.to_hf import export_to_hf
    from megatron.data.blend_builder import build_blended_datasets
    from megatron.training.logging import read_metrics
    from megatron.training.pretrain import pretrain

    checkpoints = tmp_path / "eval" / "checkpoints"
    shutil.copytree(FIXTURE / "checkpoints", checkpoints)
    run = body(tmp_path, corpus, "eval", eval_only=True)
    cfg = config_from_dict(run)
    state = pretrain(cfg)

    assert state.iteration == 3
    assert sorted(p.name for p in checkpoints.iterdir()) == ["global_step3", "latest", "latest_checkpointed_iteration.txt"]
    records = read_metrics(tmp_path / "eval" / "run" / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == [("valid", 3)]
    assert not (tmp_path / "eval" / "run" / "config.yaml").exists()  # the run's own config is left alone
    printed = capsys.readouterr().out
    assert "blend" in printed and all(f"\n{lang} " in printed for lang in ("fr", "sw", "python"))

    # transformers on the export, over the first micro-batch of each language's validation set.
    export_to_hf(checkpoints, tmp_path / "hf", progress=False)
    hf = BloomForCausalLM.from_pretrained(tmp_path / "hf").eval()
    t = cfg.training
    specs = [(d.name, d.prefix, d.weight) for d in cfg.data.datasets]
    datasets = build_blended_datasets(specs, cfg.model.seq_length, t.seed, cfg.data.split, t.train_iters * 4,
                                      t.micro_batch_size, 0, alpha=cfg.data.alpha, cache_dir=cfg.data.cache_dir)
    for lang in ("fr", "sw", "python"):
        dataset = datasets.valid_per_language[lang]
        batch = torch.stack([torch.as_tensor(dataset[i]["text"], dtype=torch.long) for i in range(t.micro_batch_size)])
        with torch.no_grad():
            logits = hf(batch[:, :-1]).logits
        expected = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()
        assert records[0][f"validation/{lang} loss"] == pytest.approx(expected, abs=1e-5), lang
