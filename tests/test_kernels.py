"""Every fused kernel equals its PyTorch reference, forward and backward, and the registry
chooses, logs and refuses implementations as the config says."""

from __future__ import annotations

import pytest
import torch

from megatron.config import ModelConfig, OptimizerConfig
from megatron.model.alibi import alibi_slopes
from megatron.model.kernels import cross_entropy, elementwise, implementation, kernel_names, select_adam, select_kernels


def get_kernel(name: str, fused: bool = True):
    """The fused implementation of ``name`` (attention, or cross entropy from logits), or its reference."""
    if name == "cross_entropy":
        return cross_entropy.fused_cross_entropy if fused else cross_entropy.reference_cross_entropy
    return implementation(name, "sdpa_mask" if fused else "reference")


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
    assert kernel_names() == ["add_layer_norm", "attention", "bias_dropout_add", "bias_gelu", "cross_entropy"]
    with pytest.raises(KeyError, match="unknown kernel implementation softmax/fused"):
        implementation("softmax", "fused")


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 1.6e-2)])
def test_bias_gelu_matches_reference(dtype, atol):
    x = (3 * torch.randn(5, 7, 64)).to(dtype).requires_grad_()
    bias = torch.randn(64).to(dtype).requires_grad_()
    weights = torch.randn(5, 7, 64)
    results = []
    for fn in (elementwise.fused_bias_gelu, elementwise.reference_bias_gelu):
        out = fn(x, bias)
        assert out.dtype == dtype
        (out.float() * weights).sum().backward()
        results.append((out.detach().float(), x.grad.float().clone(), bias.grad.float().clone()))
        x.grad = bias.grad = None
    (out, gx, gb), (ref_out, ref_gx, ref_gb) = results
    # bf16: both round an fp32 result once; a rounding step apart at most.
    assert (out - ref_out).abs().max().item() <= atol * max(1.0, ref_out.abs().max().item())
    assert (gx - ref_gx).abs().max().item() <= atol * max(1.0, ref_gx.abs().max().item())
    assert (gb - ref_gb).abs().max().item() <= atol * 40 * max(1.0, ref_gb.abs().max().item())


def test_bias_dropout_add_matches_reference():
    x, residual = torch.randn(4, 6, 32, requires_grad=True), torch.randn(4, 6, 32, requires_grad=True)
    bias = torch.randn(32, requires_grad=True)
    for training, p in ((False, 0.3), (True, 0.0)):
        fused = elementwise.fused_bias_dropout_add(x, bias, residual, p, training)
        assert torch.equal(fused, elementwise.reference_bias_dropout_add(x, bias, residual, p, training))
    # With dropout, the same stream gives the same mask as the reference's F.dropout.
    torch.manual_seed(3)
    fused = elementwise.fused_bias_dropout_add(x, bias, residual, 0.5, True)
    torch.manual_seed(3)
    assert torch.equal(fused, residual + torch.nn.functional.dropout(x + bias, 0.5, True))


def test_add_layer_norm_matches_the_block_s_two_steps():
    x, residual = torch.randn(3, 5, 32, requires_grad=True), torch.randn(3, 5, 32, requires_grad=True)
    bias, weight, ln_bias = (torch.randn(32, requires_grad=True) for _ in range(3))
    total, normed = elementwise.fused_add_layer_norm(x, bias, residual, weight, ln_bias, 1e-5)
    expected_total = residual + (x + bias)
    mean = expected_total.mean(-1, keepdim=True)
    var = expected_total.var(-1, unbiased=False, keepdim=True)
    expected = (expected_total - mean) / torch.sqrt(var + 1e-5) * weight + ln_bias  # the LayerNorm formula
    torch.testing.assert_close(total, expected_total, rtol=0, atol=0)
    torch.testing.assert_close(normed, expected, rtol=1e-5, atol=1e-5)
    (normed.square().sum() + total.sum()).backward()
    grads = [t.grad.clone() for t in (x, residual, bias, weight, ln_bias)]
    for t in (x, residual, bias, weight, ln_bias):
        t.grad = None
    (expected.square().sum() + expected_total.sum()).backward()
    for got, t in zip(grads, (x, residual, bias, weight, ln_bias)):
        torch.testing.assert_close(got, t.grad, rtol=1e-4, atol=1e-5)


def test_selection_follows_the_config_and_refuses_what_cannot_run():
    cpu = select_kernels(ModelConfig(), "cpu")
    assert (cpu.attention.name, cpu.cross_entropy.name) == ("sdpa_chunked", "chunked")
    assert "no recompute on cpu" in cpu.cross_entropy.reason
    assert cpu.bias_gelu.name == "reference" and "matmul-bound" in cpu.bias_gelu.reason
    cuda = select_kernels(ModelConfig(), "cuda")
    assert (cuda.bias_gelu.name, cuda.bias_dropout_add.name, cuda.cross_entropy.name) == ("fused", "fused",
                                                                                          "fused_linear")
    assert (cpu.add_layer_norm.name, cuda.add_layer_norm.name) == ("reference", "fused")
    dropout = select_kernels(ModelConfig(hidden_dropout=0.1), "cuda").add_layer_norm
    assert dropout.name == "reference" and "model.hidden_dropout=0.1" in dropout.reason
    assert select_kernels(ModelConfig(layernorm_fusion=False), "cuda").add_layer_norm.name == "reference"
    off = select_kernels(ModelConfig(bias_gelu_fusion=False, masked_softmax_fusion=False), "cuda")
    assert (off.bias_gelu.name, off.attention.name) == ("reference", "reference")
    assert "model.bias_gelu_fusion=false" in off.describe()
    plain = select_kernels(ModelConfig(use_fused_kernels=False), "cuda")
    assert {plain.attention.name, plain.cross_entropy.name, plain.bias_gelu.name} == {"reference"}
    with pytest.raises(ValueError, match="model.attention_implementation: 'softmax' is not an implementation"):
        select_kernels(ModelConfig(attention_implementation="softmax"), "cpu")
    with pytest.raises(ValueError, match="model.attention_implementation: attention implementation 'flash' cannot "
                                         "run here"):
        select_kernels(ModelConfig(attention_implementation="flash"), "cpu")
    assert select_adam(OptimizerConfig(), "cpu").name == "torch_fused"
    assert select_adam(OptimizerConfig(), "cuda").name == "deepspeed_fused"
    with pytest.raises(ValueError, match="optimizer.adam_implementation: 'deepspeed_fused' cannot run here"):
        select_adam(OptimizerConfig(adam_implementation="deepspeed_fused"), "cpu")


def test_model_with_fused_elementwise_kernels_equals_the_reference_model():
    """The fused path (biases taken apart from the matmuls) trains the same function."""
    import dataclasses

    from megatron.model.bloom import build_model
    from megatron.model.kernels import KernelChoice

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, seq_length=16,
                      init_method_std=0.2)
    reference = build_model(cfg, seed=1)
    cpu = select_kernels(cfg, "cpu")
    fused = dataclasses.replace(
        cpu, bias_gelu=KernelChoice("bias_gelu", "fused", "test", elementwise.fused_bias_gelu),
        bias_dropout_add=KernelChoice("bias_dropout_add", "fused", "test", elementwise.fused_bias_dropout_add),
        add_layer_norm=KernelChoice("add_layer_norm", "fused", "test", elementwise.fused_add_layer_norm))
    model = build_model(cfg, seed=1, kernels=fused)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))  # non-zero biases
    model.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 128, (3, 16))
    outputs = []
    for m in (model, reference):
        logits = m(ids)
        logits.square().mean().backward()
        outputs.append((logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (logits, grads), (ref_logits, ref_grads) = outputs
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_attention_backward_writes_the_qkv_gradient_once():
    # q, k and v are views of one [b, s, heads, 3, d] projection: three selects' backward made
    # three zero-filled tensors of its size and two adds summed them; unbind's stacks once.
    from torch.utils._python_dispatch import TorchDispatchMode

    from megatron.model.bloom import build_model

    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=8,
                      init_method_std=0.05)
    model = build_model(cfg)
    loss = model(torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8)))
    qkv_elements = 2 * 8 * 3 * cfg.hidden_size
    made = []

    class NewQkvSized(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            views = (torch.ops.aten.view, torch.ops.aten.t, torch.ops.aten._unsafe_view)
            if isinstance(out, torch.Tensor) and out.numel() == qkv_elements and func.overloadpacket not in views:
                made.append(func.overloadpacket.__name__)
            return out

    with NewQkvSized():
        loss.backward()
    assert made == ["stack"]
