"""Autograd-aware collectives that move activations in and out of tensor-parallel regions.

They come in conjugate pairs: what one does in the forward, its partner does in the backward.

    copy_to (f)         identity    | all-reduce      input of a column-parallel layer
    reduce_from (g)     all-reduce  | identity        output of a row-parallel layer
    scatter_to          split h     | all-gather h    full hidden -> this rank's slice
    gather_from         all-gather h| split h         slices -> full hidden

and for sequence parallelism, where activations outside TP regions are split along the sequence
(each TP rank keeps s / tp positions instead of a duplicate of all s):

    scatter_to_sequence_parallel_region        split s       | all-gather s
    gather_from_sequence_parallel_region       all-gather s  | reduce-scatter s (or split s)
    reduce_scatter_to_sequence_parallel_region reduce-scatter s | all-gather s

Every function takes the TP group explicitly; ``group=None`` means no tensor parallelism, and
every function is the identity (forward and backward) when the group has one rank. Inputs are
batch-first ``[batch, seq, hidden]`` as in megatron/model/bloom.py, so the sequence dimension
defaults to 1. gloo (torch 2.13) implements all-reduce, all-gather and reduce-scatter, so the
same code runs on CPU and NCCL.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

ProcessGroup = Any


def group_size(group: Optional[ProcessGroup]) -> int:
    """Ranks in ``group``; ``None`` means no tensor parallelism (one rank)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Optional[ProcessGroup]) -> int:
    """This process's rank inside ``group`` (0 for ``None``)."""
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Sum over the group into a new tensor: reducing in place would silently change a tensor
    that autograd or the caller may still hold."""
    if group_size(group) == 1:
        return x
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def _split(x: torch.Tensor, dim: int, group: Optional[ProcessGroup]) -> torch.Tensor:
    """This rank's contiguous 1/size chunk of ``dim`` (no communication)."""
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} cannot be split evenly over {size} ranks")
    return x.chunk(size, dim)[group_rank(group)].contiguous()


def _all_gather(x: torch.Tensor, dim: int, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order."""
    size = group_size(group)
    if size == 1:
        return x
    # all_gather_single concatenates along dim 0 (rank r's tensor at rows r * n ...); other dims
    # are re-concatenated from those chunks.
    gathered = torch.empty((size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_single(gathered, x.contiguous(), group=group)
    return gathered if dim == 0 else torch.cat(gathered.chunk(size, 0), dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Sum over the group, keeping only this rank's 1/size chunk of ``dim``."""
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} cannot be reduce-scattered over {size} ranks")
    # reduce_scatter_single hands rank r the r-th chunk of dim 0: move the chunks of ``dim`` there.
    chunks = x.chunk(size, dim)
    flat = x.contiguous() if dim == 0 else torch.cat(chunks, dim=0)
    out = torch.empty_like(chunks[0], memory_format=torch.contiguous_format)
    dist.reduce_scatter_single(out, flat, group=group)
    return out


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Optional[ProcessGroup], dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Optional[ProcessGroup], dim: int, reduce_grad: bool) -> torch.Tensor:
        ctx.group, ctx.dim, ctx.reduce_grad = group, dim, reduce_grad
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.reduce_grad:
            return _reduce_scatter(grad, ctx.dim, ctx.group), None, None, None
        return _split(grad, ctx.dim, ctx.group), None, None, None


class _ReduceScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Optional[ProcessGroup], dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


def copy_to_tensor_model_parallel_region(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """f: identity forward, all-reduce backward.

    Placed before a column-parallel layer: every rank reads the same full input, but each rank's
    gradient w.r.t. it covers only its own output columns; the true gradient is their sum.
    """
    return _CopyToRegion.apply(x, group)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """g: all-reduce forward, identity backward.

    Placed after a row-parallel layer: each rank's matmul over its slice of the input features
    is a partial sum of the output. The output is then duplicated, so its gradient already is
    the full gradient on every rank.
    """
    return _ReduceFromRegion.apply(x, group)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Keep this rank's slice of the last dimension (forward); all-gather the gradient (backward).

    Used by a row-parallel layer whose input is not already split (``input_is_parallel=False``).
    """
    return _ScatterToRegion.apply(x, group, -1)


def gather_from_tensor_model_parallel_region(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """All-gather the last dimension (forward); keep this rank's slice of the gradient (backward).

    Used by a column-parallel layer with ``gather_output=True``. The code after the gather runs
    duplicated on every rank, so every rank holds the same full gradient and a split suffices.
    """
    return _GatherFromRegion.apply(x, group, -1, False)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Optional[ProcessGroup],
                                        seq_dim: int = 1) -> torch.Tensor:
    """Keep this rank's chunk of the sequence (forward); all-gather the gradient (backward).

    Enters a sequence-parallel region from duplicated activations (e.g. after the embedding).
    """
    return _ScatterToRegion.apply(x, group, seq_dim)


def gather_from_sequence_parallel_region(x: torch.Tensor, group: Optional[ProcessGroup], seq_dim: int = 1,
                                         tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    """All-gather the sequence (forward); reduce-scatter the gradient (backward).

    Replaces f before a column-parallel layer under sequence parallelism: the layer needs the
    whole sequence, and each rank's gradient is a partial sum (its own columns) of which this
    rank keeps its sequence chunk. With ``tensor_parallel_output_grad=False`` (the consumer runs
    duplicated, so gradients already agree) the backward only splits.
    """
    return _GatherFromRegion.apply(x, group, seq_dim, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Optional[ProcessGroup],
                                               seq_dim: int = 1) -> torch.Tensor:
    """Reduce-scatter the sequence (forward); all-gather the gradient (backward).

    Replaces g after a row-parallel layer under sequence parallelism: the partial sums are added
    up and each rank keeps only its sequence chunk, for the same traffic as an all-reduce.
    """
    return _ReduceScatterToRegion.apply(x, group, seq_dim)
