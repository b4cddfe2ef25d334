"""ALiBi: per-head linear biases on attention scores instead of position embeddings.

Slopes follow Press et al. as BLOOM uses them, including head counts that are not a power of
two: take the closest power of two c <= n, slopes (2^(-8/c))^k for k = 1..c, then fill the
remaining n - c heads with every other slope of the 2c-head sequence, (2^(-4/c))^k for odd k.

Tensor parallelism splits heads contiguously, so rank r of TP holds slopes
``[r * n/TP, (r + 1) * n/TP)``.
"""

from __future__ import annotations

import math

import torch


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """fp32 slopes of all ``num_heads`` heads, in head order."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base**k for k in range(1, closest + 1)]
    if closest < num_heads:
        extra_base = 2.0 ** (-4.0 / closest)
        slopes += [extra_base**k for k in range(1, 2 * (num_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_slopes_for_rank(num_heads: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The slopes of the heads that tensor-parallel rank ``tp_rank`` of ``tp_size`` holds."""
    if num_heads % tp_size:
        raise ValueError(f"num_attention_heads ({num_heads}) is not divisible by tensor parallel size {tp_size}")
    per_rank = num_heads // tp_size
    return alibi_slopes(num_heads)[tp_rank * per_rank : (tp_rank + 1) * per_rank]


def alibi_causal_bias(slopes: torch.Tensor, seq_length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive attention bias ``[heads, seq, seq]``: slope x (key - query), -inf above the diagonal.

    The relative distance (key - query <= 0) keeps values small for long sequences; it differs
    from transformers' ``slope x key`` by a per-row constant, which softmax ignores.
    """
    return alibi_causal_bias_rows(slopes, 0, seq_length, dtype)


def alibi_causal_bias_rows(slopes: torch.Tensor, query_start: int, query_end: int,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows ``query_start:query_end`` of ``alibi_causal_bias`` over the keys they can see.

    Shape ``[heads, query_end - query_start, query_end]``: keys from ``query_end`` on are masked
    for every one of these queries, so they are left out rather than filled with -inf. The
    values equal the same rows of the full bias exactly.
    """
    device = slopes.device
    keys = torch.arange(query_end, device=device, dtype=torch.float32)
    queries = torch.arange(query_start, query_end, device=device, dtype=torch.float32)
    distance = keys[None, :] - queries[:, None]  # [query, key]
    # Future keys get -inf before the per-head product: ALiBi slopes are positive, so slope x -inf
    # stays -inf, and the mask costs one pass over [query, key] instead of one over every head.
    distance.masked_fill_(distance > 0, float("-inf"))
    return (slopes.float()[:, None, None] * distance[None]).to(dtype)
