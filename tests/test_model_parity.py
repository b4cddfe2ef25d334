"""Our BLOOM equals transformers' BloomForCausalLM: logits and gradients, fp32."""

from __future__ import annotations

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

from megatron.config import ModelConfig
from megatron.convert.hf_mapping import load_hf_state_dict, ours_to_hf_state_dict
from megatron.model.alibi import alibi_slopes, alibi_slopes_for_rank
from megatron.model.bloom import build_model, count_parameters, language_model_loss
from megatron.model.layout import hf_to_ours_name

# (layers, hidden, heads, vocab): power-of-two heads, 6 and 12 heads (non-power-of-two
# ALiBi slopes), and a vocabulary that needs padding.
SHAPES = [(2, 64, 4, 256), (3, 96, 6, 384), (2, 96, 12, 250)]


def twin_models(layers, hidden, heads, vocab):
    cfg = ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, vocab_size=vocab,
                      seq_length=48, init_method_std=0.05)
    padded = cfg.padded_vocab_size()
    ours = build_model(cfg)
    hf = BloomForCausalLM(BloomConfig(vocab_size=padded, hidden_size=hidden, n_layer=layers, n_head=heads,
                                      hidden_dropout=0.0, attention_dropout=0.0))
    # Perturb LayerNorms and biases so they are not the trivial ones/zeros.
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    # Both models get our weights; loading them back from transformers' names is exact.
    hf.load_state_dict(ours_to_hf_state_dict(ours.state_dict()))
    fresh = build_model(ours.cfg)
    load_hf_state_dict(fresh, hf.state_dict())
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, ours.state_dict()[name]), name
    return cfg, ours, hf


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"L{s[0]}-h{s[1]}-heads{s[2]}-V{s[3]}")
def test_logits_and_gradients_match_transformers(shape):
    cfg, ours, hf = twin_models(*shape)
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.seq_length + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    ours_logits = ours(inputs)
    hf_logits = hf(inputs).logits
    assert ours_logits.shape == hf_logits.shape == (3, cfg.seq_length, cfg.padded_vocab_size())
    assert (ours_logits - hf_logits).abs().max().item() <= 1e-5

    language_model_loss(ours_logits, labels).backward()
    language_model_loss(hf_logits, labels).backward()
    hf_grads = {hf_to_ours_name(n): p.grad for n, p in hf.named_parameters()}
    for name, param in ours.named_parameters():
        expected = hf_grads[name]
        rel = (param.grad - expected).norm() / expected.norm().clamp(min=1e-12)
        assert rel.item() <= 1e-5, f"{name}: relative gradient difference {rel.item():.2e}"


def test_hf_loss_equals_ours_on_the_same_batch():
    cfg, ours, hf = twin_models(*SHAPES[0])
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length))
    hf_loss = hf(tokens, labels=tokens).loss  # transformers shifts labels internally
    ours_loss = language_model_loss(ours(tokens[:, :-1]), tokens[:, 1:])
    assert abs(hf_loss.item() - ours_loss.item()) <= 1e-5


@pytest.mark.parametrize("heads", [1, 2, 3, 5, 6, 8, 12, 16, 20, 32, 112])
def test_alibi_slopes_match_transformers(heads):
    seq = 7
    hf = build_alibi_tensor(torch.ones(1, seq), heads, torch.float32).view(heads, seq)
    expected = hf[:, 1]  # slope x key position 1
    assert torch.allclose(alibi_slopes(heads), expected, rtol=0, atol=1e-7)


def test_alibi_slopes_are_sliced_contiguously_per_tp_rank():
    full = alibi_slopes(112)
    parts = [alibi_slopes_for_rank(112, r, 4) for r in range(4)]
    assert torch.equal(torch.cat(parts), full)
    with pytest.raises(ValueError, match="not divisible"):
        alibi_slopes_for_rank(6, 0, 4)


def test_initialisation_follows_bloom():
    cfg = ModelConfig(num_layers=8, hidden_size=256, num_attention_heads=4, vocab_size=512, init_method_std=0.02)
    model = build_model(cfg)
    def std(name: str) -> float:
        return dict(model.named_parameters())[name].std().item()

    assert std("layers.0.self_attention.query_key_value.weight") == pytest.approx(0.02, rel=0.05)
    assert std("layers.0.mlp.dense_4h_to_h.weight") == pytest.approx(0.02 / 4.0, rel=0.05)  # 1/sqrt(2 x 8)
    assert std("layers.0.self_attention.dense.weight") == pytest.approx(0.02 / 4.0, rel=0.05)
    assert torch.all(model.layers[0].input_layernorm.weight == 1)
    assert torch.all(model.layers[0].mlp.dense_h_to_4h.bias == 0)


def test_head_is_tied_and_counted_once():
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=250, init_method_std=0.02)
    model = build_model(cfg)
    counts = count_parameters(model)
    h, L, V = 64, 2, 256
    assert counts["total"] == V * h + 2 * h + L * (12 * h * h + 13 * h) + 2 * h
    assert counts["embedding"] == V * h


def test_dropout_is_active_only_in_training():
    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=128, hidden_dropout=0.5,
                      attention_dropout=0.5, seq_length=16)
    model = build_model(cfg)
    tokens = torch.randint(0, 128, (2, 16))
    model.eval()
    assert torch.equal(model(tokens), model(tokens))
    model.train()
    assert not torch.equal(model(tokens), model(tokens))


def test_greedy_generation_matches_transformers():
    cfg, ours, hf = twin_models(*SHAPES[0])
    prompt = torch.randint(0, cfg.vocab_size, (1, 5))
    ours_tokens = ours.eval().generate_greedy(prompt, max_new_tokens=8)
    # Our greedy search never emits padding rows; restrict transformers the same way.
    hf.eval()
    tokens = prompt
    with torch.no_grad():
        for _ in range(8):
            nxt = hf(tokens).logits[:, -1, : cfg.vocab_size].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], 1)
    assert torch.equal(ours_tokens, tokens)
