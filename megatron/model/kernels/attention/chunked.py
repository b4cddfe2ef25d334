"""ALiBi causal attention over query blocks: no [heads, s, s] bias or mask is ever built.

For a block of queries ``[start, end)`` only keys ``[0, end)`` are visible (later keys are
masked for all of them), so each block builds just its bias ``[heads, end - start, end]``
(the rows ``alibi_causal_bias_rows`` gives, from one small table: ``BlockBias``) and attends
over those keys. That also skips the fully masked
upper half of the score matrix, which the full-mask kernel computes and then throws away.

Autograd through SDPA per block would keep every block's bias for the backward, heads x s x s / 2
in all, so neither path below lets it:

* CPU without dropout: an autograd Function over PyTorch's CPU flash-attention kernel and its
  backward (the ATen ops behind SDPA there). The forward keeps each block's output and
  log-sum-exp (one float per query and head); the backward rebuilds one block's bias at a time
  and calls the kernel's backward. No block is computed twice.
* Otherwise (dropout, CUDA): SDPA per block under ``torch.utils.checkpoint``, which keeps only
  the block's inputs (q, k, v and the slopes, alive anyway) and recomputes the block, bias
  included, in the backward: one block forward more.

Dropout: SDPA draws each block's mask from the default generator of the inputs' device, in
block order, i.e. from whatever stream the caller made current (the model's tensor-parallel
stream). The checkpoint saves that generator's state before each block and restores it for the
recompute, so the backward sees the forward's masks; nothing is reseeded.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.autograd.function import once_differentiable

from megatron.model.kernels.attention.reference import compute_dtype

# Queries per block. On a 2-core AVX2 CPU (bloom-560m's 16 heads, s = 2048), blocks of 128-256
# queries ran forward + backward fastest; 64 was slower when the cores were shared (twice the
# kernel calls, each a parallel region), 512 slower too (bench/README.md, "Attention memory").
# A block's bias is at most BIAS_BUDGET_ELEMENTS (32 MiB in fp32) unless MIN_BLOCK needs more.
MIN_BLOCK, MAX_BLOCK = 128, 256
BIAS_BUDGET_ELEMENTS = 2**23


def block_size(heads: int, seq: int) -> int:
    """Queries per block: the largest power of two in [MIN_BLOCK, MAX_BLOCK] whose bias
    heads x block x seq fits BIAS_BUDGET_ELEMENTS (MIN_BLOCK if none does)."""
    block = MAX_BLOCK
    while block > MIN_BLOCK and heads * block * seq > BIAS_BUDGET_ELEMENTS:
        block //= 2
    return block


class BlockBias:
    """The ALiBi + causal bias of any query block of one call, each a single product.

    ``distance[i, c] = c - i - seq``, -inf where positive (a future key), over [block, seq + block]:
    the block of queries [start, end) over keys [0, end) is the window of columns from
    ``seq - start`` (key j is column seq - start + j), so every block is ``slopes x window``, equal
    to ``alibi_causal_bias_rows(slopes, start, end)`` exactly. Building each block's distances
    afresh would cost several more passes per block, which on a shared CPU adds up (each op is a
    parallel region).
    """

    def __init__(self, slopes: torch.Tensor, seq: int, block: int):
        device = slopes.device
        columns = torch.arange(seq + block, device=device)
        distance = (columns[None, :] - torch.arange(block, device=device)[:, None] - seq).float()
        # ALiBi slopes are positive, so slope x -inf stays -inf.
        self.distance = distance.masked_fill_(distance > 0, float("-inf"))
        self.slopes = slopes.float()[:, None, None]
        self.seq = seq

    def __call__(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """[1, heads, end - start, end]: the 4-D float mask SDPA's fused kernels take."""
        window = self.distance[: end - start, self.seq - start : self.seq - start + end]
        return (self.slopes * window[None]).to(dtype)[None]


def _attend_block(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: BlockBias,
                  start: int, end: int, dropout_p: float) -> torch.Tensor:
    """Attention of queries [start, end) over keys [0, end), with that block's bias only."""
    return F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, :end], value[:, :, :end],
                                          attn_mask=bias(start, end, query.dtype), dropout_p=dropout_p)


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


class _CpuFlashBlocks(torch.autograd.Function):
    """Query blocks through the CPU flash kernel; the backward rebuilds each block's bias."""

    @staticmethod
    def forward(ctx, query, key, value, slopes, block):
        seq = query.shape[-2]
        bias = BlockBias(slopes, seq, block)
        if block >= seq:  # one block: the kernel's outputs as they are
            out, logsumexp = _CPU_FLASH(query, key, value, attn_mask=bias(0, seq, query.dtype))
        else:
            out = query.new_empty(query.shape)
            logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
            for start in range(0, seq, block):
                end = min(start + block, seq)
                out[:, :, start:end], logsumexp[:, :, start:end] = _CPU_FLASH(
                    query[:, :, start:end], key[:, :, :end], value[:, :, :end], attn_mask=bias(start, end, query.dtype))
        ctx.save_for_backward(query, key, value, slopes, out, logsumexp)
        ctx.block = block
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        query, key, value, slopes, out, logsumexp = ctx.saved_tensors
        seq = query.shape[-2]
        bias = BlockBias(slopes, seq, ctx.block)
        grad_query = grad_key = grad_value = None
        # Last block first: it sees every key, so its key and value gradients are full-size and
        # become the sums the earlier blocks add into; a single block needs no copy at all.
        for start in reversed(range(0, seq, ctx.block)):
            end = min(start + ctx.block, seq)
            rows = slice(start, end)
            dq, dk, dv = _CPU_FLASH_BACKWARD(
                grad_out[:, :, rows], query[:, :, rows], key[:, :, :end], value[:, :, :end], out[:, :, rows],
                logsumexp[:, :, rows], 0.0, False, attn_mask=bias(start, end, query.dtype))
            if grad_key is None:
                grad_key, grad_value = dk, dv
                if start == 0:
                    return dq, dk, dv, None, None
                grad_query = query.new_empty(query.shape)
            else:
                grad_key[:, :, :end] += dk
                grad_value[:, :, :end] += dv
            grad_query[:, :, rows] = dq
        return grad_query, grad_key, grad_value, None, None


def _checkpointed_blocks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slopes: torch.Tensor,
                         dropout_p: float, block: int) -> torch.Tensor:
    """SDPA per block, each under torch.utils.checkpoint when autograd will need its backward."""
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    bias = BlockBias(slopes, query.shape[-2], block)
    outs = []
    for start in range(0, query.shape[-2], block):
        end = min(start + block, query.shape[-2])
        if recompute:
            out = torch.utils.checkpoint.checkpoint(_attend_block, query, key, value, bias, start, end, dropout_p,
                                                    use_reentrant=False, preserve_rng_state=dropout_p > 0.0)
        else:
            out = _attend_block(query, key, value, bias, start, end, dropout_p)
        outs.append(out)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


PATHS = ("cpu_flash", "checkpoint")


def sdpa_chunked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slopes: torch.Tensor,
                           dropout_p: float = 0.0, *, block: Optional[int] = None,
                           path: Optional[str] = None) -> torch.Tensor:
    """ALiBi causal attention, [batch, heads, seq, head_dim], one query block at a time.

    ``block`` (queries per block) defaults to ``block_size(heads, seq)``; peak memory grows with
    heads x block x seq, not heads x seq x seq. ``path`` (one of PATHS) defaults to "cpu_flash"
    where it can run (CPU, no dropout) and "checkpoint" elsewhere; benchmarks and tests name it.
    """
    dtype, work = query.dtype, compute_dtype(query)
    query, key, value = query.to(work), key.to(work), value.to(work)
    block = block or block_size(query.shape[1], query.shape[-2])
    if block < 1:
        raise ValueError(f"attention block size must be positive, got {block}")
    cpu_flash_runs = (query.device.type == "cpu" and dropout_p == 0.0
                      and _CPU_FLASH is not None and _CPU_FLASH_BACKWARD is not None)
    if path is None:
        path = "cpu_flash" if cpu_flash_runs else "checkpoint"
    if path == "cpu_flash":
        if not cpu_flash_runs:
            raise ValueError(f"sdpa_chunked path 'cpu_flash' needs CPU inputs, dropout 0 and torch's CPU flash ops; "
                             f"got {query.device.type}, dropout {dropout_p}: leave path unset")
        out = _CpuFlashBlocks.apply(query, key, value, slopes, block)
    elif path == "checkpoint":
        out = _checkpointed_blocks(query, key, value, slopes, dropout_p, block)
    else:
        raise ValueError(f"sdpa_chunked path must be one of {PATHS} or None, got {path!r}")
    return out.to(dtype)
