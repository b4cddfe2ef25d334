"""Continue training from a transformers BLOOM: import at TP2 x PP2, train, and the first step's
loss is the loss transformers computes on the same batch."""

from __future__ import annotations

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM

from launch import run_ranks
from megatron.config import config_from_dict
from megatron.convert.from_hf import import_from_hf
from megatron.data.blend_builder import build_blended_datasets
from megatron.model.bloom import language_model_loss
from training_utils import VOCAB, synthetic_corpus, tiny_run, train_losses

pytestmark = pytest.mark.distributed


def worker(rank: int, body: dict) -> None:
    from megatron.training.pretrain import pretrain

    pretrain(config_from_dict(body))


def first_global_batch(body: dict) -> torch.Tensor:
    """The samples the trainer's first step reads: the blend's first global batch, in order."""
    cfg = config_from_dict(body)
    t, d = cfg.training, cfg.data
    specs = [(s.name, s.prefix, s.weight) for s in d.datasets]
    sets = build_blended_datasets(specs, cfg.model.seq_length, t.seed, d.split, t.global_batch_size * t.train_iters,
                                  cfg.logging.eval_iters * t.micro_batch_size, 0, alpha=d.alpha)
    return torch.stack([torch.as_tensor(sets.train[i]["text"]) for i in range(t.global_batch_size)])


def test_imported_hf_model_trains_from_the_same_loss(tmp_path):
    torch.manual_seed(0)
    hf = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4,
                                      hidden_dropout=0.0, attention_dropout=0.0, initializer_range=0.05))
    hf.save_pretrained(tmp_path / "hf")
    import_from_hf(tmp_path / "hf", tmp_path / "imported", tp=2, pp=2, progress=False)

    body = tiny_run(tmp_path, synthetic_corpus(tmp_path / "corpus"),
                    parallel={"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2},
                    training={"train_iters": 2}, logging={"eval_interval": 0},
                    checkpoint={"load": str(tmp_path / "imported"), "save": str(tmp_path / "ckpt")})
    run_ranks(worker, 4, (body,), timeout=600)

    text = first_global_batch(body)
    with torch.no_grad():
        expected = language_model_loss(hf(text[:, :-1]).logits, text[:, 1:], fused=False).item()
    losses = train_losses(tmp_path / "run")
    assert len(losses) == 2
    assert abs(losses[0] - expected) <= 1e-5, (losses[0], expected)
