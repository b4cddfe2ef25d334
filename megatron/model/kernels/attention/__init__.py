"""Causal self-attention with ALiBi: one function, several implementations, one table.

Every implementation has the signature ``(query, key, value, slopes, dropout_p=0.0) -> out`` on
tensors [batch, heads, seq, head_dim] (``slopes``: this tensor-parallel rank's heads) and equals
``reference_alibi_attention`` (tests/test_attention_kernels.py):

    reference     plain PyTorch in fp32, scores and probabilities materialised: the specification
    sdpa_mask     SDPA with the full [1, heads, s, s] ALiBi + causal float mask (reference.py)
    sdpa_chunked  SDPA per query block with that block's bias only; any device, dropout (chunked.py)
    flex          FlexAttention, compiled; CUDA, no dropout (flex.py)
    flash         flash-attn's causal ALiBi kernel; CUDA, fp16/bf16, no dropout (flash.py)

``choose_attention("auto", ...)`` picks the fastest that can run; the model's fused kernel
(``fused_alibi_attention``, what ``get_kernel("attention")`` returns) is ``sdpa_chunked``.
Attention dropout draws from the caller's current random stream; no path reseeds anything.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron.model.kernels.attention import flash, flex
from megatron.model.kernels.attention.chunked import sdpa_chunked_attention
from megatron.model.kernels.attention.flash import flash_alibi_attention
from megatron.model.kernels.attention.flex import flex_alibi_attention
from megatron.model.kernels.attention.reference import reference_alibi_attention, sdpa_mask_attention

__all__ = ["ATTENTION_IMPLEMENTATIONS", "choose_attention", "flash_alibi_attention", "flex_alibi_attention",
           "fused_alibi_attention", "reference_alibi_attention", "sdpa_chunked_attention", "sdpa_mask_attention",
           "unavailable_reason"]

AttentionFn = Callable[..., torch.Tensor]

ATTENTION_IMPLEMENTATIONS: dict[str, AttentionFn] = {
    "reference": reference_alibi_attention,
    "sdpa_mask": sdpa_mask_attention,
    "sdpa_chunked": sdpa_chunked_attention,
    "flex": flex_alibi_attention,
    "flash": flash_alibi_attention,
}

# What "auto" tries on CUDA, best first; the last one runs everywhere.
_CUDA_PREFERENCE = ("flash", "flex", "sdpa_chunked")

fused_alibi_attention = sdpa_chunked_attention


def _runs_everywhere(device: torch.device | str, dtype: torch.dtype, dropout_p: float,
                     head_dim: Optional[int] = None) -> Optional[str]:
    return None


_UNAVAILABLE_REASON: dict[str, Callable[..., Optional[str]]] = {
    "reference": _runs_everywhere,
    "sdpa_mask": _runs_everywhere,
    "sdpa_chunked": _runs_everywhere,
    "flex": flex.unavailable_reason,
    "flash": flash.unavailable_reason,
}


def _check_name(name: str) -> None:
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention_implementation: unknown {name!r}; choose 'auto' or one of "
                         f"{sorted(ATTENTION_IMPLEMENTATIONS)}")


def unavailable_reason(name: str, device: torch.device | str, dtype: torch.dtype, dropout_p: float,
                       head_dim: Optional[int] = None) -> Optional[str]:
    """Why implementation ``name`` cannot train on ``device`` with inputs of ``dtype`` and this attention
    dropout (and ``head_dim``, where known), or None if it can."""
    _check_name(name)
    return _UNAVAILABLE_REASON[name](device, dtype, dropout_p, head_dim)


def choose_attention(requested: str, device: torch.device | str, dtype: torch.dtype, dropout_p: float,
                     head_dim: Optional[int] = None) -> tuple[str, str]:
    """(implementation name, why) for ``attention_implementation: requested``.

    ``"auto"``: on CUDA flash if flash-attn is installed and dropout is 0, else flex if it is
    available and dropout is 0, else sdpa_chunked; elsewhere sdpa_chunked. A named
    implementation is returned as is if it can run, and raises ValueError saying why otherwise.
    """
    device = torch.device(device)
    if requested != "auto":
        _check_name(requested)
        reason = unavailable_reason(requested, device, dtype, dropout_p, head_dim)
        if reason is not None:
            fallback, _ = choose_attention("auto", device, dtype, dropout_p, head_dim)
            raise ValueError(f"attention_implementation: {requested!r} cannot run here: {reason}. Set it to 'auto' "
                             f"(here: {fallback!r}) or another of {sorted(ATTENTION_IMPLEMENTATIONS)}")
        return requested, "requested"
    if device.type != "cuda":
        return "sdpa_chunked", f"auto on {device.type}: SDPA per query block"
    skipped = []
    for name in _CUDA_PREFERENCE:
        reason = unavailable_reason(name, device, dtype, dropout_p, head_dim)
        if reason is None:
            why = "auto on cuda" + (f" ({'; '.join(skipped)})" if skipped else "")
            return name, why
        skipped.append(f"not {name}: {reason}")
    raise AssertionError("sdpa_chunked runs everywhere")  # unreachable: the last preference has no reason
