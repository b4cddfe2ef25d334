"""Causal self-attention with ALiBi.

The fused path is ``scaled_dot_product_attention`` with the ALiBi + causal bias as an explicit
float mask of shape [1, heads, s, s]: with that 4-D shape PyTorch's CPU dispatcher picks its
flash-attention kernel (a 3-D mask falls back to the unfused math path), and on GPUs the
memory-efficient kernel, both of which never materialise the attention probabilities for the
backward. On a CPU without native bf16 (AVX2) the flash kernel runs bf16 inputs about 4.5x
slower than fp32 ones forward+backward (the backward; the forward is on par), so bf16 inputs are
computed in fp32 there and cast back (bench/README.md, "Attention on CPU by input dtype").
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


def fused_alibi_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slopes: torch.Tensor,
                          dropout_p: float = 0.0) -> torch.Tensor:
    """The same function through PyTorch's fused SDPA kernels."""
    dtype = query.dtype
    if query.device.type == "cpu" and dtype == torch.bfloat16:
        query, key, value = query.float(), key.float(), value.float()
    bias = alibi_causal_bias(slopes, query.shape[-2], dtype=query.dtype)[None]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout_p)
    return out.to(dtype)
