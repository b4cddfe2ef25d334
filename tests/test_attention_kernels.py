"""Every attention implementation equals ``reference_alibi_attention``, forward and backward.

The CPU runs reference, sdpa_mask and sdpa_chunked in full, flex forward only (PyTorch has no
FlexAttention backward on CPU); flash needs CUDA and flash-attn, so here only its selection
logic is checked. Dropout cannot share the reference's mask directly, so the mask sdpa_chunked
drew is read back (attention over an identity value matrix returns the dropped probabilities)
and the reference is run with that mask.
"""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from megatron.core.tensor_parallel import MODEL_PARALLEL_RNG, initialize_rng
from megatron.model.alibi import alibi_causal_bias, alibi_causal_bias_rows, alibi_slopes, alibi_slopes_for_rank
from megatron.model.kernels.attention import (
    ATTENTION_IMPLEMENTATIONS,
    choose_attention,
    chunked,
    flex,
    reference_alibi_attention,
    sdpa_chunked_attention,
    sdpa_mask_attention,
    unavailable_reason,
)
from megatron.model.kernels.attention.chunked import BIAS_BUDGET_ELEMENTS, BlockBias, block_size
from megatron.utils.live_memory import allocation_profile

SEQ = 37  # not a multiple of any block below: the last block is ragged
SLOPES = {"6 heads": alibi_slopes(6), "12 heads, TP2 rank 1": alibi_slopes_for_rank(12, 1, 2),
          "4 heads": alibi_slopes(4)}
TRAINABLE_ON_CPU = {
    "sdpa_mask": sdpa_mask_attention,
    "sdpa_chunked": sdpa_chunked_attention,  # one block at this length
    "sdpa_chunked, block 16": functools.partial(sdpa_chunked_attention, block=16),
    "sdpa_chunked, block 5": functools.partial(sdpa_chunked_attention, block=5),
    # The path CUDA takes (and the CPU with dropout): SDPA per block under torch.utils.checkpoint.
    "sdpa_chunked via checkpoint, block 16": functools.partial(sdpa_chunked_attention, block=16, path="checkpoint"),
}


def _inputs(heads: int, dtype: torch.dtype, seq: int = SEQ, head_dim: int = 16, seed: int = 0, batch: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq, head_dim, generator=gen).to(dtype).requires_grad_() for _ in range(3)]


def _forward_backward(fn, q, k, v, slopes, dropout_p=0.0):
    """Output and grads of q, k, v for a fixed random upstream gradient, all in fp32."""
    out = fn(q, k, v, slopes, dropout_p)
    assert out.dtype == q.dtype and out.shape == q.shape
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    q.grad = k.grad = v.grad = None
    (out.float() * upstream).sum().backward()
    return [out.detach().float()] + [t.grad.float() for t in (q, k, v)]


@pytest.mark.parametrize("slopes_name", list(SLOPES))
@pytest.mark.parametrize("impl", list(TRAINABLE_ON_CPU))
def test_fp32_forward_and_backward_match_reference(impl, slopes_name):
    slopes = SLOPES[slopes_name]
    q, k, v = _inputs(len(slopes), torch.float32)
    expected = _forward_backward(reference_alibi_attention, q, k, v, slopes)
    got = _forward_backward(TRAINABLE_ON_CPU[impl], q, k, v, slopes)
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=2e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("impl", list(TRAINABLE_ON_CPU))
def test_bf16_matches_reference_within_one_rounding(impl):
    """bf16 inputs are attended in fp32 and the output (and input grads) rounded once to bf16, as
    the reference does, so results differ by at most one bf16 step (2^-8 relative)."""
    slopes = SLOPES["12 heads, TP2 rank 1"]
    q, k, v = _inputs(len(slopes), torch.bfloat16)
    expected = _forward_backward(reference_alibi_attention, q, k, v, slopes)
    got = _forward_backward(TRAINABLE_ON_CPU[impl], q, k, v, slopes)
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(g, e, rtol=2**-7, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_causal_and_slope_form():
    """The future does not change the past; ALiBi's relative and key-position forms agree."""
    slopes = alibi_slopes(6)
    q, k, v = (t.detach() for t in _inputs(6, torch.float32))
    out = sdpa_chunked_attention(q, k, v, slopes, block=8)
    v2 = v.clone()
    v2[:, :, 20:] += 100.0
    assert torch.equal(sdpa_chunked_attention(q, k, v2, slopes, block=8)[:, :, :20], out[:, :, :20])
    # BLOOM (transformers) adds slope x key position; it differs by a per-row constant.
    scores = q @ k.transpose(-1, -2) / math.sqrt(16) + slopes[:, None, None] * torch.arange(SEQ)
    scores = scores.masked_fill(torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slopes_name", list(SLOPES))
def test_block_bias_equals_the_rows_of_the_full_bias(slopes_name):
    slopes, seq, block = SLOPES[slopes_name], SEQ, 16
    table, full = BlockBias(slopes, seq, block), alibi_causal_bias(slopes, seq)
    for start in range(0, seq, block):
        end = min(start + block, seq)
        assert torch.equal(table(start, end, torch.float32)[0], full[:, start:end, :end])
        assert torch.equal(alibi_causal_bias_rows(slopes, start, end), full[:, start:end, :end])


def test_block_size_bounds_the_bias():
    assert block_size(16, 2048) == 256  # bloom-560m
    assert block_size(16, 4096) == 128
    assert block_size(28, 2048) == 128  # BLOOM-176B at TP4: 112 / 4 heads
    for heads, seq in [(16, 512), (16, 1024), (16, 2048), (28, 2048), (8, 4096)]:
        assert heads * block_size(heads, seq) * seq <= BIAS_BUDGET_ELEMENTS


def _peak_bytes(fn) -> int:
    """Peak of CPU bytes allocated and not yet freed while ``fn`` runs (the profiler's allocation
    events; counts kernels' scratch buffers too)."""
    return allocation_profile(fn)[0]


@pytest.mark.parametrize("path", chunked.PATHS)
def test_chunked_peak_memory_stays_below_one_full_mask(path):
    """Forward + backward never holds the [heads, s, s] bias, nor all blocks' biases at once
    (together half the full one); what it holds is grads and output (1.5 MiB here) and a block's
    bias (1 MiB)."""
    heads, seq = 8, 1024
    q, k, v = _inputs(heads, torch.float32, seq=seq, seed=2, batch=1)
    slopes = alibi_slopes(heads)
    full_mask_bytes = heads * seq * seq * 4

    def peak(fn):
        q.grad = k.grad = v.grad = None
        return _peak_bytes(lambda: fn(q, k, v, slopes).sum().backward())

    assert peak(sdpa_mask_attention) >= full_mask_bytes  # the tracker sees the mask
    assert peak(functools.partial(sdpa_chunked_attention, block=32, path=path)) < full_mask_bytes / 4


DROPOUT_P = 0.3


def _dropout_inputs():
    """Head dim >= seq, so a value matrix of ones on the diagonal returns the attention matrix."""
    heads, seq, head_dim = 3, 29, 32
    q, k, _ = _inputs(heads, torch.float32, seq=seq, head_dim=head_dim, seed=3)
    identity = torch.eye(seq, head_dim).expand(2, heads, seq, head_dim)
    return q, k, identity, alibi_slopes(heads)


def _chunked(q, k, v, slopes, dropout_p=DROPOUT_P):
    return sdpa_chunked_attention(q, k, v, slopes, dropout_p, block=8)


def test_dropout_is_deterministic_under_a_seed_and_leaves_the_caller_stream_alone():
    q, k, v = _inputs(4, torch.float32, seed=4)
    slopes = alibi_slopes(4)
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        got = _forward_backward(_chunked, q, k, v, slopes, DROPOUT_P)
        runs.append(got)
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][0], runs[2][0])
    # The backward's recompute replays the masks without advancing the caller's generator.
    torch.manual_seed(5)
    out = _chunked(q, k, v, slopes)
    after_forward = torch.get_rng_state()
    out.sum().backward()
    assert torch.equal(torch.get_rng_state(), after_forward)


def test_dropout_equals_reference_with_the_same_mask():
    q, k, identity, slopes = _dropout_inputs()
    seq = q.shape[-2]
    with torch.no_grad():
        torch.manual_seed(7)
        dropped = _chunked(q, k, identity, slopes)[..., :seq]  # dropout(softmax(...)) itself
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
                              + alibi_causal_bias(slopes, seq)[None], dim=-1)
    visible = torch.ones(seq, seq, dtype=torch.bool).tril().expand_as(probs)
    kept = dropped != 0
    # Kept probabilities are the reference's scaled by 1 / (1 - p); about p of them are dropped.
    torch.testing.assert_close(dropped[kept], probs[kept] / (1 - DROPOUT_P), rtol=1e-5, atol=1e-6)
    assert not kept[~visible].any()
    dropped_fraction = 1.0 - kept[visible].float().mean().item()
    assert abs(dropped_fraction - DROPOUT_P) < 0.04  # 2,610 draws (seeded): 4.4 standard deviations

    # Same seed, real values: output and all gradients equal the reference with that mask, so the
    # backward (which recomputes each block) used the forward's mask.
    v = torch.randn(identity.shape, generator=torch.Generator().manual_seed(8)).requires_grad_()

    def reference_with_mask(q, k, v, slopes, dropout_p):
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + alibi_causal_bias(slopes, seq)[None]
        return (torch.softmax(scores, -1) * kept / (1 - dropout_p)) @ v

    expected = _forward_backward(reference_with_mask, q, k, v, slopes, DROPOUT_P)
    torch.manual_seed(7)
    got = _forward_backward(_chunked, q, k, v, slopes, DROPOUT_P)
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=2e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_dropout_draws_from_the_tensor_parallel_stream():
    """Called as BloomAttention calls it: inside the tracker's fork, masks come from the TP stream."""
    tracker = initialize_rng(9)
    q, k, v = _inputs(4, torch.float32, seed=10)
    default_before = torch.get_rng_state()
    outs = []
    for _ in range(2):
        tracker.set_states({MODEL_PARALLEL_RNG: initialize_rng(9).get_states()[MODEL_PARALLEL_RNG]})
        torch.set_rng_state(default_before)
        with tracker.fork():
            outs.append(_chunked(q, k, v, alibi_slopes(4)))
        assert torch.equal(torch.get_rng_state(), default_before)
        outs[-1].sum().backward()
    assert torch.equal(outs[0], outs[1])


@pytest.mark.skipif(flex.flex_attention is None, reason="torch.nn.attention.flex_attention is not importable")
@pytest.mark.parametrize("slopes_name", list(SLOPES))
def test_flex_forward_on_cpu_matches_reference(slopes_name):
    slopes = SLOPES[slopes_name]
    q, k, v = (t.detach() for t in _inputs(len(slopes), torch.float32, seq=70))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        got = ATTENTION_IMPLEMENTATIONS["flex"](q, k, v, slopes)
    torch.testing.assert_close(got, reference_alibi_attention(q, k, v, slopes), rtol=1e-5, atol=1e-5)


def test_choice_on_cpu_and_reasons():
    assert choose_attention("auto", "cpu", torch.bfloat16, 0.1)[0] == "sdpa_chunked"
    assert choose_attention("sdpa_mask", "cpu", torch.float32, 0.1) == ("sdpa_mask", "requested")
    for name in ("flex", "flash"):
        assert "CUDA" in unavailable_reason(name, "cpu", torch.bfloat16, 0.0)
        assert "attention_dropout 0" in unavailable_reason(name, "cuda", torch.bfloat16, 0.1)
        with pytest.raises(ValueError, match=rf"attention_implementation: '{name}' cannot run here.*'sdpa_chunked'"):
            choose_attention(name, "cpu", torch.bfloat16, 0.0)
    with pytest.raises(ValueError, match="attention_implementation: unknown 'fast'; choose 'auto' or one of"):
        choose_attention("fast", "cpu", torch.float32, 0.0)


def test_auto_on_cuda_without_a_gpu_falls_back_by_dropout(monkeypatch):
    """The CUDA order (flash, flex, sdpa_chunked), with the two probes stubbed: no GPU needed."""
    from megatron.model.kernels import attention

    stub = {"flash": None, "flex": None}
    monkeypatch.setitem(attention._UNAVAILABLE_REASON, "flash", lambda *a: stub["flash"])
    monkeypatch.setitem(attention._UNAVAILABLE_REASON, "flex", lambda *a: stub["flex"])
    assert choose_attention("auto", "cuda", torch.bfloat16, 0.0)[0] == "flash"
    stub["flash"] = "flash-attn is not importable"
    name, why = choose_attention("auto", "cuda", torch.bfloat16, 0.0)
    assert name == "flex" and "flash-attn is not importable" in why
    stub["flex"] = "no triton"
    assert choose_attention("auto", "cuda", torch.bfloat16, 0.0)[0] == "sdpa_chunked"
    # The real probes refuse dropout before looking for a GPU.
    monkeypatch.undo()
    assert choose_attention("auto", "cuda", torch.bfloat16, 0.1)[0] == "sdpa_chunked"


def test_sdpa_mask_path_still_builds_the_full_mask_for_comparison():
    """sdpa_mask is kept as the baseline bench/attention_memory.py measures against."""
    q, k, v = (t.detach() for t in _inputs(2, torch.float32))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=alibi_causal_bias(alibi_slopes(2), SEQ)[None])
    assert torch.equal(sdpa_mask_attention(q, k, v, alibi_slopes(2)), expected)


def test_chunked_path_choice():
    """CPU without dropout takes the flash-ops path (this torch has them); dropout the checkpoint one."""
    assert chunked._CPU_FLASH is not None and chunked._CPU_FLASH_BACKWARD is not None
    q, k, v = _inputs(2, torch.float32)
    with pytest.raises(ValueError, match="path 'cpu_flash' needs CPU inputs, dropout 0"):
        sdpa_chunked_attention(q, k, v, alibi_slopes(2), 0.1, path="cpu_flash")
    with pytest.raises(ValueError, match="path must be one of"):
        sdpa_chunked_attention(q, k, v, alibi_slopes(2), path="fast")
