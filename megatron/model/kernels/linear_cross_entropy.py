"""LM head and cross entropy in one: per-token losses from the hidden states and the head weight,
over chunks of tokens, so the [tokens, vocab] logits never exist, forward or backward.

At BLOOM's vocabulary (250,880) the logits of 2,048 tokens are 2 GB in fp32; the plain path
(``F.linear``, then a cross entropy that keeps an fp32 log-softmax and writes an fp32 gradient)
holds several such tensors at once. Here a chunk of ``chunk_tokens`` rows is multiplied out,
reduced to per-token statistics and dropped:

    forward   z = hidden[chunk] @ W^T     (input dtype, fp32 accumulation as any matmul)
              keep max_v z, sum_v exp(z - max), z[label]          three fp32 numbers per token
    backward  recompute z, p = softmax(z) - one_hot(label)        (one fp32 chunk)
              grad_hidden[chunk] = p @ W,  grad_W += p^T @ hidden[chunk]

so the memory beyond the inputs is one chunk of fp32 logits (and its bf16 copy for bf16 inputs)
plus O(tokens) numbers. The price is a second product in the backward (4 instead of 3 of the
head's matmuls) and reading W once per chunk, in each pass, instead of once: bigger chunks mean
fewer passes over W, hence the chunk is sized by bytes (``_CHUNK_BYTES`` of fp32 logits), not
by a fixed token count.

``grad_W`` is accumulated chunk by chunk in the weight's dtype, so in bf16 it is rounded once
per chunk rather than once (an fp32 accumulator would cost twice the bf16 weight, more than the
logits it saves); fp32 runs are unaffected beyond summation order.

Tensor parallelism: ``weight`` is this rank's vocabulary slice [V/tp, h] and the statistics are
combined as ``megatron/core/tensor_parallel/cross_entropy.py`` does, one all-reduce of [tokens]
each: MAX of the max, SUM of the label logit (only the rank holding the label contributes),
SUM of the sum of exps (each rank's rescaled from its own max to the global one). The backward
needs no communication: each rank forms softmax - one_hot on its own columns and returns the
partial gradient of ``hidden`` for its slice. The sum over slices is the job of the operator
that brought ``hidden`` into the TP region (f, or the sequence-parallel all-gather, whose
backward all-reduces or reduce-scatters it), so call this after that operator, as ``F.linear``
would be called.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core.tensor_parallel.cross_entropy import all_reduce_, shard_labels, vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.mappings import group_size
from megatron.model.kernels.cross_entropy import fused_cross_entropy, reference_cross_entropy

ProcessGroup = Any

# fp32 logits per chunk: 64 MB is 66 tokens at BLOOM's 250,880 columns (267 at TP=4). Small
# enough not to matter next to the weight, large enough that re-reading W per chunk stays cheap.
_CHUNK_BYTES = 64 << 20


def default_chunk_tokens(vocab_columns: int) -> int:
    """Tokens per chunk so that one chunk of fp32 logits over ``vocab_columns`` is ~64 MB."""
    return max(1, _CHUNK_BYTES // (4 * max(vocab_columns, 1)))


def _chunks(rows: int, step: int) -> Iterator[slice]:
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                group: Optional[ProcessGroup], chunk_tokens: int) -> torch.Tensor:
        tokens = hidden.shape[0]
        local_labels, outside = shard_labels(labels, weight.shape[0], group)
        max_logit, sum_exp, label_logit = (hidden.new_empty(tokens, dtype=torch.float32) for _ in range(3))
        for rows in _chunks(tokens, chunk_tokens):
            logits = F.linear(hidden[rows], weight).float()  # a fresh fp32 chunk: edited in place below
            max_logit[rows] = logits.amax(dim=-1)
            label_logit[rows] = logits.gather(1, local_labels[rows, None]).squeeze(1)
            sum_exp[rows] = logits.sub_(max_logit[rows, None]).exp_().sum(dim=-1)
            del logits  # else the next chunk's product is made while this one is still held
        label_logit.masked_fill_(outside, 0.0)
        if group_size(group) > 1:
            global_max = all_reduce_(max_logit.clone(), group, dist.ReduceOp.MAX)
            sum_exp = all_reduce_(sum_exp.mul_(torch.exp(max_logit - global_max)), group)
            label_logit = all_reduce_(label_logit, group)
            max_logit = global_max
        log_sum_exp = max_logit + sum_exp.log()
        ctx.save_for_backward(hidden, weight, local_labels, outside, log_sum_exp)
        ctx.chunk_tokens = chunk_tokens
        return log_sum_exp - label_logit

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        hidden, weight, local_labels, outside, log_sum_exp = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        grad_losses = grad_losses.float()
        one_hot = (~outside).float().unsqueeze(1)  # 0 where the label is on another rank's slice
        for rows in _chunks(hidden.shape[0], ctx.chunk_tokens):
            probs = F.linear(hidden[rows], weight).float().sub_(log_sum_exp[rows, None]).exp_()
            probs.scatter_add_(1, local_labels[rows, None], -one_hot[rows])
            grad_logits = probs.mul_(grad_losses[rows, None]).to(hidden.dtype)
            if want_hidden:
                grad_hidden[rows] = grad_logits @ weight
            if want_weight:
                grad_weight.addmm_(grad_logits.t(), hidden[rows])
            del probs, grad_logits  # as in the forward: one chunk alive at a time
        return grad_hidden, grad_weight, None, None, None


def _check(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: Optional[int]) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [tokens, h] and weight [vocab (slice), h]; got hidden "
                         f"{list(hidden.shape)} and weight {list(weight.shape)}: flatten batch and sequence first")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [tokens] = {list(hidden.shape[:1])}; got {list(labels.shape)}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive number of tokens or None (about 64 MB of fp32 logits); "
                         f"got {chunk_tokens}")


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               tp_group: Optional[ProcessGroup] = None,
                               chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """Per-token fp32 losses ``[N]`` of ``F.linear(hidden [N, h], weight [V/tp, h])`` for ``labels [N]``,
    computed ``chunk_tokens`` rows at a time (default: ~64 MB of fp32 logits per chunk).

    Same values and gradients (``hidden``, ``weight``) as :func:`reference_linear_cross_entropy`.
    With ``tp_group`` of more than one rank, ``weight`` is this rank's vocabulary slice, ``labels``
    index the full vocabulary and are the same on every rank, and the forward runs three
    all-reduces of [N] over ``tp_group`` (MAX of the max logit, SUM of the label logit, SUM of the
    rescaled sum of exps) so that every rank gets the loss over the whole vocabulary; the backward
    runs none (see the module docstring for where the gradient of ``hidden`` is summed). Under
    autocast the inputs are cast to the autocast dtype first, as ``F.linear`` would be.
    """
    _check(hidden, weight, labels, chunk_tokens)
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    with torch.autocast(device, enabled=False):  # the backward runs outside autocast: so must the forward
        return _LinearCrossEntropy.apply(hidden, weight, labels, tp_group,
                                         chunk_tokens or default_chunk_tokens(weight.shape[0]))


class _LogitsInPlaceCrossEntropy(torch.autograd.Function):
    """TP=1, fp32, CPU: the logits' own buffer becomes the log-probabilities in the forward and the
    gradient of the logits in the backward, so no second [tokens, vocab] tensor is made.

        forward   z = hidden @ W^T;  z <- log_softmax(z) in place;  loss = -z[label]
        backward  z <- exp(z) in place (the softmax);  z[label] -= 1
                  grad_hidden = g * (z @ W),  grad_W = z^T @ (g * hidden)

    The per-token gradient ``g`` of the losses scales the two [tokens, h] operands instead of
    the [tokens, vocab] softmax: a pass over the largest tensor of the step saved. A second
    backward through the same graph is refused by autograd (the saved buffer was modified in
    place), as ``retain_graph`` would otherwise read the softmax as log-probabilities.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_probs = hidden @ weight.t()
        # torch's CPU log_softmax reads a row fully (max, sum of exps) before writing it, so the
        # output may be the input (tests/test_linear_cross_entropy.py checks the values). Not
        # used on CUDA, where that has not been checked (the fused_linear head is its default).
        torch._log_softmax(log_probs, 1, False, out=log_probs)
        ctx.save_for_backward(hidden, weight, labels, log_probs)
        return log_probs.gather(1, labels[:, None]).squeeze(1).neg_()

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        hidden, weight, labels, log_probs = ctx.saved_tensors
        probs = log_probs.exp_()
        probs.scatter_add_(1, labels[:, None], probs.new_full((labels.shape[0], 1), -1.0))
        scale = grad_losses.to(probs.dtype)[:, None]
        grad_hidden = (probs @ weight).mul_(scale) if ctx.needs_input_grad[0] else None
        grad_weight = probs.t() @ (hidden * scale) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None


def logits_in_place(device_type: str, dtype: torch.dtype, tp_size: int) -> bool:
    """Whether the chunked head keeps one [tokens, vocab] buffer for the logits and their gradient
    (:class:`_LogitsInPlaceCrossEntropy`): fp32 logits at TP=1 on CPU. The memory plan asks too."""
    return device_type == "cpu" and dtype == torch.float32 and tp_size == 1


def chunked_logits_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 tp_group: Optional[ProcessGroup] = None,
                                 chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """Full logits ``F.linear(hidden, weight)`` in the input dtype, then a cross entropy that needs
    no fp32 copy of them (megatron/model/kernels/cross_entropy.py; with TP the vocabulary-parallel
    one, three all-reduces over ``tp_group``). No logits recompute in the backward: the fastest
    path where the logits fit. With fp32 logits at TP=1 on CPU, the logits' buffer is turned into
    the log-probabilities and then the gradient in place (:class:`_LogitsInPlaceCrossEntropy`).
    ``chunk_tokens`` is ignored (same signature as the others)."""
    _check(hidden, weight, labels, chunk_tokens)
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    if weight.dtype == hidden.dtype and logits_in_place(device, dtype, group_size(tp_group)):
        return _LogitsInPlaceCrossEntropy.apply(hidden, weight, labels)
    logits = F.linear(hidden, weight)
    if group_size(tp_group) > 1:
        return vocab_parallel_cross_entropy(logits, labels, tp_group)
    return fused_cross_entropy(logits, labels)


def reference_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   tp_group: Optional[ProcessGroup] = None,
                                   chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """The plain path: full logits ``F.linear(hidden, weight)``, then the fp32 cross entropy
    (``vocab_parallel_cross_entropy`` with three all-reduces over ``tp_group`` when it has more
    than one rank). ``chunk_tokens`` is accepted for a signature identical to the fused kernel's
    and ignored."""
    _check(hidden, weight, labels, chunk_tokens)
    logits = F.linear(hidden, weight)
    if group_size(tp_group) > 1:
        return vocab_parallel_cross_entropy(logits, labels, tp_group)
    return reference_cross_entropy(logits, labels)
