"""Tensor-parallel linear and embedding layers, Megatron-style.

Each layer holds this TP rank's shard of the single-device parameter, under the same name
(``weight``, ``bias``), so a TP model's state dict per rank is Megatron-DeepSpeed's:

    ColumnParallelLinear   weight [out/tp, in]  bias [out/tp]   shard of dim 0 (output features)
    RowParallelLinear      weight [out, in/tp]  bias [out]      shard of dim 1; bias duplicated
    VocabParallelEmbedding weight [V/tp, h]                     shard of dim 0 (vocabulary rows)

Sharded parameters carry ``tensor_model_parallel=True``, ``partition_dim`` and
``partition_stride=1`` (DeepSpeed's gradient norm counts them on every TP rank, and duplicated
ones only once); duplicated ones carry ``tensor_model_parallel=False``.

Initialisation equals the single-device model's: ``init_method`` fills a full-size "master"
weight from the default RNG stream, which is seeded identically on every TP rank, and each
rank keeps its slice. To copy an existing single-device layer instead, use ``init_from_full``.

BLOOM's fused QKV rows are laid out [head, (q, k, v), head_dim], so the contiguous dim-0 split
of ``query_key_value`` gives rank r the q, k and v of heads [r * n/tp, (r + 1) * n/tp): whole
heads, matching ``megatron.model.alibi.alibi_slopes_for_rank``.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    group_rank,
    group_size,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)

ProcessGroup = Any
InitMethod = Callable[[torch.Tensor], Any]


def default_init_method(std: float = 0.02) -> InitMethod:
    """N(0, std), Megatron's default initialisation of weights."""
    return partial(nn.init.normal_, mean=0.0, std=std)


def set_tensor_model_parallel_attributes(param: torch.Tensor, is_parallel: bool, partition_dim: int = -1,
                                         stride: int = 1) -> None:
    """Tag ``param`` as sharded along ``partition_dim`` (or, with ``is_parallel=False``, duplicated)."""
    param.tensor_model_parallel = is_parallel
    param.partition_dim = partition_dim
    param.partition_stride = stride


def shard(full: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous 1/``size`` slice of ``full`` along ``dim``."""
    if full.shape[dim] % size:
        raise ValueError(f"cannot split dimension {dim} of size {full.shape[dim]} into {size} equal shards")
    return full.chunk(size, dim)[rank]


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what} ({total}) is not divisible by the tensor parallel size {parts}")
    return total // parts


class _TensorParallelModule(nn.Module):
    """Remembers the TP group and this rank's place in it.

    ``group`` is the TP process group, a ``ParallelState`` (its TP group is used), or ``None``
    for no tensor parallelism.
    """

    def __init__(self, group: Optional[ProcessGroup]):
        super().__init__()
        group = getattr(group, "tp_group", group)
        self.tp_group = group
        self.tp_rank = group_rank(group)
        self.tp_size = group_size(group)

    @torch.no_grad()
    def _init_sharded(self, param: nn.Parameter, full_shape: tuple[int, ...], init_method: InitMethod) -> None:
        """Fill the full master weight (same RNG draws as the single-device layer), keep our slice."""
        if param.device.type == "meta":
            return
        master = torch.empty(full_shape, dtype=torch.float32, device=param.device)
        init_method(master)
        param.copy_(shard(master, param.partition_dim, self.tp_rank, self.tp_size))


class ColumnParallelLinear(_TensorParallelModule):
    """Y = X A^T + b with A's output rows split over TP: rank r computes Y[..., r-th slice].

    Forward: f (identity; its backward all-reduces the input gradient) or, with sequence
    parallelism, an all-gather of the sequence-split input; then the local matmul; then
    optionally an all-gather of the output's last dimension (``gather_output``).
    """

    def __init__(self, in_features: int, out_features: int, group: Optional[ProcessGroup] = None, *,
                 bias: bool = True, gather_output: bool = False, sequence_parallel: bool = False,
                 init_method: Optional[InitMethod] = None, seq_dim: int = 1, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device | str] = None, skip_bias_add: bool = False):
        super().__init__(group)
        if gather_output and sequence_parallel:
            raise ValueError("gather_output=True and sequence_parallel=True together are not supported: the "
                             "output of a sequence-parallel column layer stays split over TP")
        if gather_output and skip_bias_add:
            raise ValueError("gather_output=True and skip_bias_add=True together are not supported: add the bias "
                             "before gathering the output")
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.sequence_parallel, self.seq_dim = gather_output, sequence_parallel, seq_dim
        self.skip_bias_add = skip_bias_add
        local_out = _divide(out_features, self.tp_size, "out_features")
        self.weight = nn.Parameter(torch.empty(local_out, in_features, dtype=dtype, device=device))
        set_tensor_model_parallel_attributes(self.weight, True, 0)
        self._init_sharded(self.weight, (out_features, in_features), init_method or default_init_method())
        if bias:
            self.bias = nn.Parameter(torch.zeros(local_out, dtype=dtype, device=device))
            set_tensor_model_parallel_attributes(self.bias, True, 0)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``Y``; with ``skip_bias_add``, ``(X A^T, b)`` for a fused kernel to add ``b`` (Megatron's)."""
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.tp_group, self.seq_dim)
        else:
            x = copy_to_tensor_model_parallel_region(x, self.tp_group)
        if self.skip_bias_add:
            return F.linear(x, self.weight), self.bias
        y = F.linear(x, self.weight, self.bias)
        return gather_from_tensor_model_parallel_region(y, self.tp_group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} (local "
                f"{self.weight.shape[0]}), tp={self.tp_rank}/{self.tp_size}, bias={self.bias is not None}, "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(_TensorParallelModule):
    """Y = X A^T + b with A's input columns split over TP: rank r multiplies X[..., r-th slice].

    Forward: optionally split the input's last dimension (``input_is_parallel=False``); the local
    matmul gives a partial sum of Y; g all-reduces it (or, with sequence parallelism, a
    reduce-scatter leaves each rank its sequence chunk); then the full, duplicated bias is added
    once, after the reduction (adding it before would count it tp times).
    """

    def __init__(self, in_features: int, out_features: int, group: Optional[ProcessGroup] = None, *,
                 bias: bool = True, input_is_parallel: bool = True, sequence_parallel: bool = False,
                 init_method: Optional[InitMethod] = None, seq_dim: int = 1, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device | str] = None, skip_bias_add: bool = False):
        super().__init__(group)
        if sequence_parallel and not input_is_parallel:
            raise ValueError("sequence_parallel=True requires input_is_parallel=True")
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.sequence_parallel, self.seq_dim = input_is_parallel, sequence_parallel, seq_dim
        self.skip_bias_add = skip_bias_add
        local_in = _divide(in_features, self.tp_size, "in_features")
        self.weight = nn.Parameter(torch.empty(out_features, local_in, dtype=dtype, device=device))
        set_tensor_model_parallel_attributes(self.weight, True, 1)
        self._init_sharded(self.weight, (out_features, in_features), init_method or default_init_method())
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
            set_tensor_model_parallel_attributes(self.bias, False)
            self.bias.sequence_parallel = sequence_parallel
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``Y``; with ``skip_bias_add``, ``(reduced X A^T, b)`` for a fused kernel to add ``b``."""
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, self.tp_group)
        partial_sum = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(partial_sum, self.tp_group, self.seq_dim)
        else:
            y = reduce_from_tensor_model_parallel_region(partial_sum, self.tp_group)
        if self.bias is None:
            return (y, None) if self.skip_bias_add else y
        # Under sequence parallelism each rank's bias gradient covers only its sequence chunk;
        # f's backward all-reduce sums them inside autograd, before any engine sees the grads.
        bias = copy_to_tensor_model_parallel_region(self.bias, self.tp_group) if self.sequence_parallel else self.bias
        return (y, bias) if self.skip_bias_add else y + bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {self.weight.shape[1]}), out_features={self.out_features}, "
                f"tp={self.tp_rank}/{self.tp_size}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}, sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(_TensorParallelModule):
    """Embedding whose vocabulary rows are split over TP: rank r holds rows [r V/tp, (r+1) V/tp).

    Each rank looks up the tokens that fall in its range, writes zeros for the others, and an
    all-reduce (g) sums the pieces into the full embedding on every rank (or, with sequence
    parallelism, a reduce-scatter keeps each rank's sequence chunk). BLOOM's embedding LayerNorm
    comes after this reduction and is the model's job.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group: Optional[ProcessGroup] = None, *,
                 init_method: Optional[InitMethod] = None, sequence_parallel: bool = False, seq_dim: int = 1,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device | str] = None):
        super().__init__(group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.sequence_parallel, self.seq_dim = sequence_parallel, seq_dim
        local_rows = _divide(num_embeddings, self.tp_size, "num_embeddings (padded vocabulary)")
        self.vocab_start, self.vocab_end = self.tp_rank * local_rows, (self.tp_rank + 1) * local_rows
        self.weight = nn.Parameter(torch.empty(local_rows, embedding_dim, dtype=dtype, device=device))
        set_tensor_model_parallel_attributes(self.weight, True, 0)
        self._init_sharded(self.weight, (num_embeddings, embedding_dim), init_method or default_init_method())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        partial_sum = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(partial_sum, self.tp_group, self.seq_dim)
        return reduce_from_tensor_model_parallel_region(partial_sum, self.tp_group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start}, {self.vocab_end}), "
                f"tp={self.tp_rank}/{self.tp_size}")


@torch.no_grad()
def init_from_full(layer: nn.Module, full_weight: torch.Tensor, full_bias: Optional[torch.Tensor] = None) -> None:
    """Copy this rank's shard of a single-device ``weight`` (and ``bias``) into a TP layer.

    ``full_weight`` has the single-device shape (e.g. ``nn.Linear(in, out).weight``: [out, in]);
    sharded parameters take their slice along ``partition_dim``, duplicated ones the whole tensor.
    """
    for name, full in (("weight", full_weight), ("bias", full_bias)):
        param = getattr(layer, name, None)
        if full is None or param is None:
            continue
        if getattr(param, "tensor_model_parallel", False):
            full = shard(full, param.partition_dim, layer.tp_rank, layer.tp_size)
        if full.shape != param.shape:
            raise ValueError(f"{name}: shard of shape {tuple(full.shape)} does not fit parameter {tuple(param.shape)}")
        param.copy_(full)


class SequenceParallelLayerNorm(nn.LayerNorm):
    """LayerNorm that may run on a sequence chunk: TP-duplicated weights, gradients summed over TP.

    Under sequence parallelism each rank normalises only its chunk of the sequence, so its
    weight and bias gradients are partial sums. Passing the parameters through f (identity
    forward, all-reduce backward) makes autograd produce the full gradient on every rank, so the
    optimizer, clipping and ZeRO need no extra step. Without sequence parallelism it is a plain
    LayerNorm.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, group: Optional[ProcessGroup] = None,
                 sequence_parallel: bool = False, device: Optional[torch.device | str] = None,
                 compute_in_fp32: bool = False):
        super().__init__(hidden_size, eps=eps, device=device)
        self.tp_group = getattr(group, "tp_group", group)
        self.sequence_parallel = sequence_parallel and group_size(self.tp_group) > 1
        # Normalise in fp32 and cast back (StableEmbedding); a no-op for fp32 inputs.
        self.compute_in_fp32 = compute_in_fp32
        for param in self.parameters():
            param.sequence_parallel = self.sequence_parallel

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and bias as the forward uses them (under sequence parallelism through f, whose
        backward all-reduces the partial gradients): for kernels that apply this LayerNorm themselves."""
        if not self.sequence_parallel:
            return self.weight, self.bias
        return (copy_to_tensor_model_parallel_region(self.weight, self.tp_group),
                copy_to_tensor_model_parallel_region(self.bias, self.tp_group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.affine()
        if self.compute_in_fp32 and x.dtype != torch.float32:
            return F.layer_norm(x.float(), self.normalized_shape, weight.float(), bias.float(), self.eps).to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


@torch.no_grad()
def check_tp_duplicates_in_sync(module: nn.Module, group: Optional[ProcessGroup]) -> list[str]:
    """Names of TP-duplicated parameters (not tagged ``tensor_model_parallel``) that differ across
    the TP group, the same list on every rank.

    TP rank 0 broadcasts its copies (one flat buffer); each rank compares bitwise, then a max
    all-reduce of the per-parameter mismatch flags tells every rank. Duplicates drift apart when
    their gradients are not identical across TP (e.g. a missed sequence-parallel all-reduce).
    """
    named = [(n, p) for n, p in module.named_parameters() if not getattr(p, "tensor_model_parallel", False)]
    if not named or group_size(group) == 1:
        return []
    # float64 holds fp32 and bf16 values exactly, so one buffer serves every dtype; comparing
    # the int64 bit patterns makes the test bitwise (-0.0 != 0.0, a NaN equals the same NaN).
    mine = torch.cat([p.detach().reshape(-1).double() for _, p in named])
    reference = mine.clone()
    dist.broadcast(reference, src=dist.get_global_rank(group, 0), group=group)
    sizes = [p.numel() for _, p in named]
    pairs = zip(mine.view(torch.int64).split(sizes), reference.view(torch.int64).split(sizes))
    flags = torch.stack([(a != b).any() for a, b in pairs]).to(torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return [name for (name, _), differs in zip(named, flags.tolist()) if differs]
