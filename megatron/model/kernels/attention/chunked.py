"""ALiBi causal attention over query blocks: no [heads, s, s] bias or mask is ever built.

For a block of queries ``[start, end)`` only keys ``[0, end)`` are visible (later keys are
masked for all of them), so each block builds just its bias ``[heads, end - start, end]``
(``alibi_causal_bias_rows``) and calls ``scaled_dot_product_attention`` on the block. That also
skips the fully masked upper half of the score matrix, which the full-mask kernel computes and
then throws away.

Each block runs under ``torch.utils.checkpoint``: autograd would otherwise keep every block's
bias for the backward, heads x s x s / 2 in all. The checkpoint keeps nothing of the block but
its inputs (q, k, v and the slopes, alive anyway) and recomputes the block, bias included, when
its backward runs, so one block's bias exists at a time. The recompute costs a block forward;
the halved work pays for it (bench/README.md, "Attention memory: full mask against query
blocks").

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

from megatron.model.alibi import alibi_causal_bias_rows
from megatron.model.kernels.attention.reference import compute_dtype

MIN_BLOCK, MAX_BLOCK = 128, 512
# A block's bias is at most this many elements (32 MiB in fp32) unless MIN_BLOCK needs more.
BIAS_BUDGET_ELEMENTS = 2**23


def block_size(heads: int, seq: int) -> int:
    """Queries per block: the largest power of two in [MIN_BLOCK, MAX_BLOCK] whose bias
    heads x block x seq fits BIAS_BUDGET_ELEMENTS (MIN_BLOCK if none does)."""
    block = MAX_BLOCK
    while block > MIN_BLOCK and heads * block * seq > BIAS_BUDGET_ELEMENTS:
        block //= 2
    return block


def _attend_block(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slopes: torch.Tensor,
                  start: int, end: int, dropout_p: float) -> torch.Tensor:
    """Attention of queries [start, end) over keys [0, end), with that block's bias only."""
    bias = alibi_causal_bias_rows(slopes, start, end, dtype=query.dtype)[None]  # [1, heads, block, end]
    return F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, :end], value[:, :, :end],
                                          attn_mask=bias, dropout_p=dropout_p)


def sdpa_chunked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slopes: torch.Tensor,
                           dropout_p: float = 0.0, *, block: Optional[int] = None) -> torch.Tensor:
    """ALiBi causal attention, [batch, heads, seq, head_dim], one query block at a time.

    ``block`` (queries per block) defaults to ``block_size(heads, seq)``; peak memory grows with
    heads x block x seq, not heads x seq x seq.
    """
    dtype, work = query.dtype, compute_dtype(query)
    query, key, value = query.to(work), key.to(work), value.to(work)
    seq = query.shape[-2]
    block = block or block_size(query.shape[1], seq)
    if block < 1:
        raise ValueError(f"attention block size must be positive, got {block}")
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    outs = []
    for start in range(0, seq, block):
        end = min(start + block, seq)
        if recompute:
            out = torch.utils.checkpoint.checkpoint(_attend_block, query, key, value, slopes, start, end, dropout_p,
                                                    use_reentrant=False, preserve_rng_state=dropout_p > 0.0)
        else:
            out = _attend_block(query, key, value, slopes, start, end, dropout_p)
        outs.append(out)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.to(dtype)
