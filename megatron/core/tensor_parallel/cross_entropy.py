"""Cross entropy over a vocabulary split across tensor-parallel ranks, without gathering it.

With the LM head column-parallel over the vocabulary, rank r holds logits[..., r V/tp : (r+1) V/tp].
The loss per token, log(sum_v exp(z_v)) - z_label, needs three numbers from the whole
vocabulary, each one all-reduce of a [tokens] tensor instead of an all-gather of [tokens, V]:

    max_v z_v        (MAX)  for a numerically safe exp
    z_label - max    (SUM)  only the rank holding the label contributes; the others add 0
    sum_v exp(z-max) (SUM)

The backward needs no communication: d loss / d z_v = softmax(z)_v - [v == label], and each
rank computes it for its own columns from its logits and the saved per-token log-sum-exp.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron.core.tensor_parallel.mappings import group_rank, group_size

ProcessGroup = Any


def all_reduce_(x: torch.Tensor, group: Optional[ProcessGroup], op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce ``x`` over the TP group in place (the identity without TP) and return it.

    Only for the per-token statistics of the loss (max, label logit, sum of exps), which are
    fresh [tokens] tensors that nothing else holds, so reducing in place is safe.
    """
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def shard_labels(labels: torch.Tensor, shard_vocab: int, group: Optional[ProcessGroup]):
    """Labels relative to this rank's vocabulary slice, and a mask of those outside it (no
    communication: the slice is rows [rank x shard_vocab, (rank + 1) x shard_vocab))."""
    start = group_rank(group) * shard_vocab
    outside = (labels < start) | (labels >= start + shard_vocab)
    return (labels - start).masked_fill(outside, 0), outside


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
        local_labels, outside = shard_labels(labels, logits.shape[-1], group)
        logits_fp32 = logits.float()
        max_logit = all_reduce_(logits_fp32.amax(dim=-1), group, dist.ReduceOp.MAX)
        shifted = logits_fp32 - max_logit.unsqueeze(-1)
        label_logit = shifted.gather(-1, local_labels.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        label_logit = all_reduce_(label_logit, group)
        sum_exp = all_reduce_(shifted.exp_().sum(dim=-1), group)
        log_sum_exp = sum_exp.log()
        # Keep the logits (in their own dtype) and one fp32 number per token rather than an fp32
        # softmax of the shard: half the memory in bf16; the backward recomputes one exp.
        ctx.save_for_backward(logits, local_labels, outside, max_logit + log_sum_exp)
        return log_sum_exp - label_logit

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        logits, local_labels, outside, lse = ctx.saved_tensors
        grad = torch.exp(logits.float() - lse.unsqueeze(-1))
        one_hot = (~outside).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_labels.unsqueeze(-1), -one_hot)
        grad.mul_(grad_losses.float().unsqueeze(-1))
        return grad.to(logits.dtype), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                                 group: Optional[ProcessGroup] = None) -> torch.Tensor:
    """Per-token fp32 loss from this rank's vocabulary shard ``logits [..., V/tp]`` (any dtype).

    ``labels [...]`` index the full (padded) vocabulary and must be identical on all TP ranks.
    Equals ``F.cross_entropy(full_logits.float(), labels, reduction="none")`` in value and
    gradient; the gradient w.r.t. ``logits`` is written in the logits' dtype. There is no
    ``ignore_index``: mask positions out of the loss with a loss mask instead.
    """
    return _VocabParallelCrossEntropy.apply(logits, labels, group)
