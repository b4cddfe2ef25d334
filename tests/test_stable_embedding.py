"""BLOOM's StableEmbedding: vocab-parallel embedding + LayerNorm computed in fp32, with
Megatron-DeepSpeed's flag (``embed_layernorm``) and checkpoint keys (``word_embeddings.norm.*``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron.config import ConfigError, ModelConfig, config_from_dict
from megatron.model.bloom import StableEmbedding, build_model

CFG = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, seq_length=8, vocab_size=256,
                  init_method_std=0.02)


def test_the_embedding_is_a_stable_embedding_with_megatron_keys():
    model = build_model(CFG, seed=1)
    assert isinstance(model.embedding.word_embeddings, StableEmbedding)
    keys = set(model.embedding.state_dict())
    assert keys == {"word_embeddings.weight", "word_embeddings.norm.weight", "word_embeddings.norm.bias"}
    plain = build_model(ModelConfig(**{**CFG.__dict__, "embed_layernorm": False}), seed=1)
    assert set(plain.embedding.state_dict()) == {"word_embeddings.weight"}


def test_bf16_embedding_layernorm_is_computed_in_fp32():
    embedding = build_model(CFG, seed=1).embedding.word_embeddings
    with torch.no_grad():  # a LayerNorm with non-trivial parameters
        embedding.norm.weight.normal_(1.0, 0.3, generator=torch.Generator().manual_seed(2))
        embedding.norm.bias.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(3))
    embedding = embedding.to(torch.bfloat16)
    ids = torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(4))
    out = embedding(ids)
    assert out.dtype == torch.bfloat16
    rows = embedding.weight[ids].float()
    expected = F.layer_norm(rows, (64,), embedding.norm.weight.float(), embedding.norm.bias.float(), 1e-5)
    assert torch.equal(out, expected.to(torch.bfloat16))


def test_bitsandbytes_optimizer_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="use_bnb_optimizer.*ZeRO"):
        config_from_dict({"optimizer": {"use_bnb_optimizer": True}, "training": {"train_iters": 1}}).validate()
