"""Every fused kernel equals its PyTorch reference, forward and backward."""

from __future__ import annotations

import pytest
import torch

from megatron.model.alibi import alibi_slopes
from megatron.model.kernels import cross_entropy, get_kernel, kernel_names


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads", [4, 6])
def test_attention_matches_reference(dtype, atol, heads):
    q, k, v = (torch.randn(2, heads, 33, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    slopes = alibi_slopes(heads)
    outs, grads = [], []
    for fused in (True, False):
        out = get_kernel("attention", fused)(q, k, v, slopes)
        assert out.dtype == dtype and out.shape == q.shape
        (out.float() * torch.linspace(-1, 1, 16)).sum().backward()
        outs.append(out.detach().float())
        grads.append([t.grad.float().clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    assert (outs[0] - outs[1]).abs().max().item() <= atol
    for fused_grad, ref_grad in zip(*grads):
        assert (fused_grad - ref_grad).abs().max().item() <= atol * 4


def test_attention_is_causal():
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    out = get_kernel("attention", True)(q, k, v, alibi_slopes(2))
    v2 = v.clone()
    v2[:, :, 5:] += 100.0  # the future must not change the past
    out2 = get_kernel("attention", True)(q, k, v2, alibi_slopes(2))
    assert torch.equal(out[:, :, :5], out2[:, :, :5])


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-6)])
def test_cross_entropy_matches_reference(dtype, atol, monkeypatch):
    monkeypatch.setattr(cross_entropy, "_CHUNK_ELEMENTS", 1000)  # several chunks, one ragged
    logits = (3 * torch.randn(37, 300)).to(dtype).requires_grad_()
    labels = torch.randint(0, 300, (37,))
    weights = torch.rand(37)
    results = []
    for fused in (True, False):
        losses = get_kernel("cross_entropy", fused)(logits, labels)
        assert losses.dtype == torch.float32
        (losses * weights).sum().backward()
        results.append((losses.detach(), logits.grad.float().clone()))
        logits.grad = None
    (fused_loss, fused_grad), (ref_loss, ref_grad) = results
    assert (fused_loss - ref_loss).abs().max().item() <= 1e-5
    # bf16 gradients are rounded once from fp32 in both paths.
    assert (fused_grad - ref_grad).abs().max().item() <= (atol if dtype == torch.float32 else 4e-3)


def test_registry_names_and_errors():
    assert kernel_names() == ["attention", "cross_entropy"]
    with pytest.raises(KeyError, match="unknown kernel 'softmax'"):
        get_kernel("softmax")
