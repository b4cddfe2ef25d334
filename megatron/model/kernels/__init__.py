"""Fused kernels behind one small registry; each has a plain PyTorch reference.

``get_kernel(name, fused)`` returns the fused implementation when ``fused`` is true and the
reference otherwise. Tests check every fused kernel against its reference in forward and
backward, so the reference is the specification.

Kernels:
    attention      causal self-attention with an ALiBi bias
    cross_entropy  per-token next-token loss in fp32 from (bf16) logits
"""

from __future__ import annotations

from typing import Callable

from megatron.model.kernels import attention, cross_entropy

_REGISTRY: dict[str, dict[bool, Callable]] = {
    "attention": {True: attention.fused_alibi_attention, False: attention.reference_alibi_attention},
    "cross_entropy": {True: cross_entropy.fused_cross_entropy, False: cross_entropy.reference_cross_entropy},
}


def get_kernel(name: str, fused: bool = True) -> Callable:
    """The fused (or reference) implementation of kernel ``name``."""
    try:
        return _REGISTRY[name][fused]
    except KeyError:
        raise KeyError(f"unknown kernel {name!r}; known: {sorted(_REGISTRY)}") from None


def kernel_names() -> list[str]:
    """Names of every registered kernel."""
    return sorted(_REGISTRY)
