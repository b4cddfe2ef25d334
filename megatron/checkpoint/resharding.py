"""Merging and splitting tensor-parallel shards of layer-file tensors.

Merging concatenates split tensors along their dimension (megatron/model/layout.py's table)
and takes rank 0's copy of duplicated ones (they are equal in a healthy run; Megatron's tools
average them, which gives the same tensor then). Splitting is the reverse: contiguous chunks, so
each rank keeps whole attention heads because the fused QKV rows are laid out
[head, (q, k, v), head_dim].
"""

from __future__ import annotations

from typing import Sequence

import torch

from megatron.errors import ConversionError
from megatron.model.layout import partition_dim


def merge_shards(key: str, shards: Sequence[torch.Tensor], where: str = "") -> tuple[torch.Tensor, float]:
    """One TP-merged tensor from every rank's shard (rank order) and, for duplicated tensors,
    the largest absolute difference of any rank's copy from rank 0's (0.0 otherwise).

    ``where`` (e.g. the layer file names) goes into error messages.
    """
    dim = partition_dim(key)
    if len(shards) == 1:
        return shards[0], 0.0
    if dim is not None:
        shapes = {tuple(s.shape) for s in shards}
        rest = {shape[:dim] + shape[dim + 1:] for shape in shapes}
        if len(rest) != 1:
            raise ConversionError(f"{key}{where}: TP shards have shapes {sorted(shapes)} that cannot be "
                                  f"concatenated along dim {dim}; the files come from different checkpoints")
        return torch.cat(list(shards), dim=dim), 0.0
    first = shards[0]
    drift = 0.0
    for other in shards[1:]:
        if other.shape != first.shape:
            raise ConversionError(f"{key}{where}: duplicated tensor has shape {tuple(other.shape)} on one TP rank "
                                  f"and {tuple(first.shape)} on rank 0; the files come from different checkpoints")
        if not torch.equal(other, first):
            drift = max(drift, (other.float() - first.float()).abs().max().item())
    return first, drift


def split_full(key: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """TP rank ``tp_rank``'s part of the merged tensor ``full``: a tensor with storage of its own
    when split (safe to ``torch.save``), ``full`` itself when duplicated or ``tp_size`` is 1."""
    dim = partition_dim(key)
    if dim is None or tp_size == 1:
        return full
    if full.shape[dim] % tp_size:
        raise ConversionError(f"{key}: dimension {dim} of shape {tuple(full.shape)} does not split into {tp_size} "
                              "equal tensor-parallel shards; pick a TP size that divides it")
    return full.chunk(tp_size, dim)[tp_rank].clone(memory_format=torch.contiguous_format)


def sharded_shape(key: str, full_shape: Sequence[int], tp_size: int) -> tuple[int, ...]:
    """Shape of one TP rank's shard of a tensor whose merged shape is ``full_shape``."""
    dim = partition_dim(key)
    shape = list(full_shape)
    if dim is not None:
        shape[dim] //= tp_size
    return tuple(shape)
