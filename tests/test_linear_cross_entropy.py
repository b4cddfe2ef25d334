"""The fused LM head + cross entropy equals the plain PyTorch computation (``F.linear``, then
``F.cross_entropy`` on fp32 logits) in losses and in the gradients of hidden and weight: at TP=1,
at TP=2 (vocabulary-parallel, behind f or the sequence-parallel gather), and in the model."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from launch import run_ranks
from megatron.config import ModelConfig
from megatron.model.bloom import build_model
from megatron.model.kernels.linear_cross_entropy import (
    chunked_logits_cross_entropy,
    fused_linear_cross_entropy,
    reference_linear_cross_entropy,
)
from megatron.utils.live_memory import LiveStorageBytes

N, H, V = 37, 24, 250  # 37 tokens: no chunk size below divides it; V / 2 = 125 columns per TP rank
BF16_ULP = 2.0**-8


def make_inputs(dtype: torch.dtype, seed: int = 0):
    """hidden [N, H], weight [V, H], labels [N] hitting both halves of the vocabulary, loss weights [N]."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) / 2).to(dtype)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[:2] = torch.tensor([3, V - 1])
    assert (labels < V // 2).any() and (labels >= V // 2).any()
    return hidden, weight, labels, torch.rand(N, generator=gen)


def plain(hidden, weight, labels, loss_weights):
    """Losses and gradients by plain PyTorch autograd: logits in the input dtype, loss in fp32."""
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    losses = F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="none")
    (losses * loss_weights).sum().backward()
    return losses.detach(), hidden.grad, weight.grad


def run(fn, hidden, weight, labels, loss_weights, **kwargs):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    losses = fn(hidden, weight, labels, **kwargs)
    (losses * loss_weights).sum().backward()
    return losses.detach(), hidden.grad, weight.grad


def rel_max(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference relative to the largest expected magnitude."""
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.mark.parametrize("chunk_tokens", [1, 5, 16, N, 100, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_plain_pytorch(dtype, chunk_tokens):
    inputs = make_inputs(dtype)
    expected = plain(*inputs)
    losses, grad_hidden, grad_weight = run(fused_linear_cross_entropy, *inputs, chunk_tokens=chunk_tokens)
    assert losses.dtype == torch.float32 and grad_hidden.dtype == grad_weight.dtype == dtype
    assert rel_max(losses, expected[0]) <= 1e-6  # fp32 from the same logits in both dtypes
    if dtype == torch.float32:
        assert rel_max(grad_hidden, expected[1]) <= 1e-5
        assert rel_max(grad_weight, expected[2]) <= 1e-5
    else:
        # grad_hidden: the same bf16 roundings; grad_weight: summed over chunks in bf16, one
        # rounding per chunk instead of one in all (a few ulps of the largest entry).
        assert rel_max(grad_hidden, expected[1]) <= BF16_ULP
        assert rel_max(grad_weight, expected[2]) <= 4 * BF16_ULP


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_logits_matches_plain_pytorch(dtype):
    # fp32: log-probabilities and then the gradient in the logits' own buffer; bf16: the logits
    # in bf16, then the chunked fp32 cross entropy.
    inputs = make_inputs(dtype)
    expected = plain(*inputs)
    losses, grad_hidden, grad_weight = run(chunked_logits_cross_entropy, *inputs)
    assert losses.dtype == torch.float32 and grad_hidden.dtype == grad_weight.dtype == dtype
    assert rel_max(losses, expected[0]) <= 1e-6
    tolerance = 1e-5 if dtype == torch.float32 else BF16_ULP
    assert rel_max(grad_hidden, expected[1]) <= tolerance
    assert rel_max(grad_weight, expected[2]) <= tolerance


def test_chunked_logits_in_fp32_make_one_tensor_of_logits_size():
    # The logits; their buffer then holds the log-probabilities and the gradient (before: a
    # second [N, V] tensor for the gradient).
    hidden, weight, labels, loss_weights = make_inputs(torch.float32)
    hidden.requires_grad_(), weight.requires_grad_()
    with NewTensorShapes() as mode:
        (chunked_logits_cross_entropy(hidden, weight, labels) * loss_weights).sum().backward()
    assert mode.made.count((N, V)) == 1, mode.made


def test_chunked_logits_refuse_a_second_backward_through_the_graph():
    hidden, weight, labels, _ = make_inputs(torch.float32)
    hidden.requires_grad_()
    loss = chunked_logits_cross_entropy(hidden, weight, labels).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_plain_computation(dtype):
    inputs = make_inputs(dtype)
    for got, expected in zip(run(reference_linear_cross_entropy, *inputs), plain(*inputs)):
        assert torch.equal(got, expected)


def test_autocast_casts_like_f_linear():
    hidden, weight, labels, loss_weights = make_inputs(torch.float32)
    results = []
    for fn in (reference_linear_cross_entropy, fused_linear_cross_entropy):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(run(fn, hidden, weight, labels, loss_weights))
    (ref_loss, ref_hidden, ref_weight), (loss, grad_hidden, grad_weight) = results
    assert grad_hidden.dtype == grad_weight.dtype == torch.float32  # through the casts to the fp32 leaves
    assert rel_max(loss, ref_loss) <= 1e-6
    assert rel_max(grad_hidden, ref_hidden) <= BF16_ULP
    assert rel_max(grad_weight, ref_weight) <= 4 * BF16_ULP


class NewTensorShapes(TorchDispatchMode):
    """Records the shape of every tensor an op returns in new memory (not a view or an in-place
    result: those share a storage with an input)."""

    def __init__(self):
        super().__init__()
        self.shapes = set()
        self.made = []  # every new tensor's shape, in order

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.shapes.add(tuple(t.shape))
                self.made.append(tuple(t.shape))
        return out


def test_no_tensor_larger_than_one_chunk_of_logits():
    hidden, weight, labels, loss_weights = make_inputs(torch.float32)
    hidden.requires_grad_(), weight.requires_grad_()
    with NewTensorShapes() as mode:
        (fused_linear_cross_entropy(hidden, weight, labels, chunk_tokens=5) * loss_weights).sum().backward()
    made = {shape: torch.Size(shape).numel() for shape in mode.shapes if shape != (V, H)}  # but the weight's gradient
    assert max(made.values()) == 5 * V and made[(5, V)]  # one chunk of logits, never [N, V]


def test_live_memory_tracker_counts_what_only_autograd_holds():
    x = torch.ones(1000, requires_grad=True)  # made before the tracker: not counted
    with LiveStorageBytes() as tracker:
        y = x.exp()  # 4,000 bytes, saved by exp's backward
        loss = y.sum()  # 4 bytes
        del y  # the graph still holds it
        z = torch.empty(2000)  # 8,000 bytes: the peak is reached here
        del z, loss  # frees the graph, hence y
        torch.empty(1000)  # 4,000 bytes alone
    assert tracker.peak() == 4000 + 4 + 8000
    assert sum(delta for _, delta in tracker.events) == 0  # everything made inside was released


def test_fused_peak_memory_is_one_chunk_of_logits():
    tokens, vocab, chunk = 64, 4096, 8
    hidden = torch.randn(tokens, H, requires_grad=True)
    weight = (torch.randn(vocab, H) / 4).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,))
    peaks = {}
    for fn in (fused_linear_cross_entropy, reference_linear_cross_entropy):
        hidden.grad = weight.grad = None
        with LiveStorageBytes() as tracker:
            fn(hidden, weight, labels, chunk_tokens=chunk).mean().backward()
        peaks[fn] = tracker.peak(exclude=[tracker.allocation_of(weight.grad)])  # as the weight: not the head's cost
    chunk_bytes, logits_bytes = chunk * vocab * 4, tokens * vocab * 4
    # One fp32 chunk of logits, the gradient of hidden and a few numbers per token.
    assert chunk_bytes <= peaks[fused_linear_cross_entropy] <= chunk_bytes + tokens * H * 4 + 64 * tokens
    # The plain path: logits, log-softmax and their gradients, three [tokens, vocab] at once.
    assert peaks[reference_linear_cross_entropy] >= 3 * logits_bytes


@pytest.mark.parametrize("fn", [fused_linear_cross_entropy, reference_linear_cross_entropy])
def test_bad_shapes_name_the_argument(fn):
    hidden, weight, labels, _ = make_inputs(torch.float32)
    with pytest.raises(ValueError, match="flatten batch and sequence"):
        fn(hidden[None], weight, labels)
    with pytest.raises(ValueError, match=r"labels must be \[tokens\] = \[37\]"):
        fn(hidden, weight, labels[1:])
    with pytest.raises(ValueError, match="chunk_tokens must be a positive"):
        fn(hidden, weight, labels, chunk_tokens=0)


def tp2_worker(rank: int) -> dict:
    """Each rank holds half the vocabulary; hidden comes in through f (or the sequence gather)."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region

    dist.init_process_group("gloo")
    group = dist.new_group([0, 1])
    rows = slice(rank * V // 2, (rank + 1) * V // 2)
    found = {}
    try:
        for dtype in (torch.float32, torch.bfloat16):
            hidden, weight, labels, loss_weights = make_inputs(dtype)
            expected = plain(hidden, weight, labels, loss_weights)
            for name, fn in (("fused", fused_linear_cross_entropy), ("reference", reference_linear_cross_entropy)):
                x, w = hidden.clone().requires_grad_(), weight[rows].clone().requires_grad_()
                losses = fn(copy_to_tensor_model_parallel_region(x, group), w, labels, group, chunk_tokens=5)
                (losses * loss_weights).sum().backward()
                found[f"{name} {dtype}"] = [rel_max(losses, expected[0]), rel_max(x.grad, expected[1]),
                                            rel_max(w.grad, expected[2][rows])]
            # Sequence parallel: this rank holds tokens [rank N/2, ...) of an even-length sequence.
            tokens = slice(rank * (N - 1) // 2, (rank + 1) * (N - 1) // 2)
            even = [t[: N - 1] for t in (hidden, labels, loss_weights)]
            expected = plain(even[0], weight, even[1], even[2])
            x, w = even[0][tokens].clone().requires_grad_(), weight[rows].clone().requires_grad_()
            full = gather_from_sequence_parallel_region(x[None], group, tensor_parallel_output_grad=True)[0]
            losses = fused_linear_cross_entropy(full, w, even[1], group, chunk_tokens=5)
            (losses * even[2]).sum().backward()
            found[f"sequence parallel {dtype}"] = [rel_max(losses, expected[0]), rel_max(x.grad, expected[1][tokens]),
                                                   rel_max(w.grad, expected[2][rows])]
    finally:
        dist.destroy_process_group()
    return found


@pytest.fixture(scope="module")
def tp2():
    return run_ranks(tp2_worker, 2)


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["fused", "reference", "sequence parallel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_parallel_matches_plain_pytorch(tp2, case, dtype):
    # Gradients: fp32 tight; bf16 as at TP=1 (grad_hidden now sums two bf16 partials: 2 ulps).
    tolerances = [1e-6, 1e-5, 1e-5] if dtype == torch.float32 else [1e-6, 2 * BF16_ULP, 4 * BF16_ULP]
    for rank, found in enumerate(tp2):
        diffs = found[f"{case} {dtype}"]
        assert all(d <= tol for d, tol in zip(diffs, tolerances)), (rank, diffs)


@pytest.mark.parametrize("head", ["fused_linear", "chunked", "reference"])
def test_model_returns_the_masked_mean_loss_given_labels(head):
    import dataclasses

    from megatron.model.kernels import KernelChoice, implementation, select_kernels

    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=250, seq_length=16,
                      init_method_std=0.05)
    kernels = dataclasses.replace(select_kernels(cfg, "cpu"), cross_entropy=KernelChoice(
        "cross_entropy", head, "test", implementation("cross_entropy", head)))
    model = build_model(cfg, kernels=kernels)
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.seq_length + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    loss_mask = (torch.rand(labels.shape) > 0.3).float()

    logits = model(inputs)
    assert logits.shape == (3, cfg.seq_length, cfg.padded_vocab_size())
    losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
    ((losses * loss_mask.flatten()).sum() / loss_mask.sum()).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    loss = model(inputs, labels=labels, loss_mask=loss_mask)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    loss.backward()
    assert abs(loss.item() - (losses * loss_mask.flatten()).sum().item() / loss_mask.sum().item()) <= 1e-5
    for name, param in model.named_parameters():
        rel = (param.grad - expected[name]).norm() / expected[name].norm()
        assert rel.item() <= 1e-5, f"{name}: relative gradient difference {rel.item():.2e}"
