"""The specification and the full-mask SDPA path.

``reference_alibi_attention`` is the specification every other path is tested against: it
materialises the scores and probabilities in fp32.

``sdpa_mask_attention`` is ``scaled_dot_product_attention`` with the ALiBi + causal bias as an
explicit float mask of shape [1, heads, s, s]: with that 4-D shape PyTorch's CPU dispatcher picks
its flash-attention kernel (a 3-D mask falls back to the unfused math path), and on GPUs the
memory-efficient kernel, both of which never materialise the attention probabilities for the
backward. The mask itself is heads x s x s, built on every call and kept for the backward; the
chunked path (``chunked.py``) avoids it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron.model.alibi import alibi_causal_bias


def reference_alibi_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slopes: torch.Tensor,
                              dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + ALiBi + causal) v, in fp32; tensors are [batch, heads, seq, head_dim]."""
    dtype = query.dtype
    query, key, value = query.float(), key.float(), value.float()
    scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
    scores = scores + alibi_causal_bias(slopes, query.shape[-2])[None]
    probs = F.dropout(torch.softmax(scores, dim=-1), dropout_p)
    return (probs @ value).to(dtype)


def compute_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype the SDPA paths attend in: bf16 on CPU becomes fp32.

    On a CPU without native bf16 (AVX2) PyTorch's flash kernel runs bf16 inputs about 4.5x slower
    than fp32 ones forward+backward (the backward; the forward is on par), so bf16 inputs are
    computed in fp32 there and cast back (bench/README.md, "Attention on CPU by input dtype").
    """
    if query.device.type == "cpu" and query.dtype == torch.bfloat16:
        return torch.float32
    return query.dtype


def sdpa_mask_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slopes: torch.Tensor,
                        dropout_p: float = 0.0) -> torch.Tensor:
    """The reference through PyTorch's fused SDPA kernels with the full [1, heads, s, s] mask."""
    dtype, work = query.dtype, compute_dtype(query)
    query, key, value = query.to(work), key.to(work), value.to(work)
    bias = alibi_causal_bias(slopes, query.shape[-2], dtype=work)[None]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout_p)
    return out.to(dtype)
