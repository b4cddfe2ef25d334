"""flash-attn path (CUDA): Dao's kernel with its built-in causal ALiBi; no bias tensor.

``flash_attn_func(..., causal=True, alibi_slopes=s)`` adds ``-s[h] x |i + seqlen_k - seqlen_q - j|``
to the score of query i and key j. For self-attention (seqlen_q == seqlen_k) under the causal
mask (j <= i) that is ``s[h] x (j - i)``: exactly ``alibi_causal_bias``'s slope x (key - query).
Its layout is [batch, seq, heads, head_dim]; the transposes below are views (the last dimension
stays contiguous, which is all it asks).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

_DTYPES = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256


@functools.cache
def _import_flash_attn() -> tuple[Optional[Callable], Optional[str]]:
    """(flash_attn_func, None), or (None, why the import failed); imported once (a cache)."""
    try:
        from flash_attn import flash_attn_func
    except Exception as error:  # not installed, or built against another torch / CUDA
        return None, f"{type(error).__name__}: {error}"
    return flash_attn_func, None


def unavailable_reason(device: torch.device | str, dtype: torch.dtype, dropout_p: float,
                       head_dim: Optional[int] = None) -> Optional[str]:
    """Why ``flash_alibi_attention`` cannot run here, or None if it can."""
    device = torch.device(device)
    if dropout_p > 0.0:
        return f"flash is wired without attention dropout; it needs attention_dropout 0 (BLOOM's), got {dropout_p}"
    if device.type != "cuda":
        return f"flash needs CUDA, got {device.type}"
    func, error = _import_flash_attn()
    if func is None:
        return f"flash-attn is not importable ({error}); `pip install flash-attn` for this torch and CUDA"
    if dtype not in _DTYPES:
        return f"flash-attn computes fp16 or bf16 only, got {dtype}; train in bf16 or fp16"
    if head_dim is not None and head_dim > _MAX_HEAD_DIM:
        return f"flash-attn supports head_dim up to {_MAX_HEAD_DIM}, got {head_dim}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"flash-attn 2 needs an Ampere or newer GPU (sm80+), got sm{major}{minor}"
    return None


def flash_alibi_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slopes: torch.Tensor,
                          dropout_p: float = 0.0) -> torch.Tensor:
    """ALiBi causal attention through flash-attn, [batch, heads, seq, head_dim] in and out."""
    reason = unavailable_reason(query.device, query.dtype, dropout_p, query.shape[-1])
    if reason is not None:
        raise RuntimeError(f"attention implementation 'flash' cannot run: {reason}")
    flash_attn_func, _ = _import_flash_attn()
    out = flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dropout_p=0.0,
                          causal=True, alibi_slopes=slopes.to(device=query.device, dtype=torch.float32).contiguous())
    return out.transpose(1, 2)
