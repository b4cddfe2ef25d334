"""Megatron's fused elementwise blocks: bias + GeLU(tanh), bias + dropout + residual add, and
the residual add + LayerNorm.

The column-parallel ``dense_h_to_4h`` and the row-parallel output projections hand over their
output and their bias separately (``skip_bias_add``), so the bias add joins the next
elementwise step instead of taking a pass over the activation of its own.

* ``bias_gelu``: a custom autograd function, as Megatron-DeepSpeed's ``bias_gelu_impl``: it
  saves only the pre-activation input and bias (not the sum, not the output) and computes the
  tanh-GeLU derivative analytically in the backward. The arithmetic runs in
  ``torch.compile``'d regions where a compiler is worth its start-up (CUDA: one Triton kernel
  forward, one backward), eagerly elsewhere; both evaluate the same formula.
* ``bias_dropout_add``: ``residual + dropout(x + bias)``; the dropout mask comes from
  ``torch.nn.functional.dropout`` under the caller's random-stream context, so the TP stream
  and activation recompute see exactly the masks of the unfused path.
* ``add_layer_norm``: ``(h, LayerNorm(h))`` with ``h = residual + x + bias``, the block's first
  residual add and the post-attention LayerNorm. Compiled on CUDA, one kernel reads ``x``, the
  bias and the residual once and writes ``h`` and the normalised output (the eager path reads
  ``h`` back for the LayerNorm), and AOTAutograd fuses the backward the same way. Without
  dropout only: a dropout mask must be drawn between the add and the bias.

The references are the plain PyTorch expressions the unfused model runs.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def reference_bias_gelu(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``gelu_tanh(x + bias)``, torch's own op."""
    return F.gelu(x if bias is None else x + bias, approximate="tanh")


def _gelu_tanh_forward(y: torch.Tensor) -> torch.Tensor:
    return 0.5 * y * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (y + 0.044715 * y * y * y)))


def _gelu_tanh_backward(grad: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # d/dy of 0.5 y (1 + tanh(u)), u = c (y + 0.044715 y^3): Megatron's bias_gelu_back.
    inner = _SQRT_2_OVER_PI * (y + 0.044715 * y * y * y)
    tanh = torch.tanh(inner)
    derivative = 0.5 * (1.0 + tanh) + 0.5 * y * (1.0 - tanh * tanh) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * y * y)
    return grad * derivative


@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, built once per function (a cache: compiling is the expensive part,
    and inductor caches its kernels on disk across processes too)."""
    return torch.compile(fn, dynamic=True, fullgraph=True)


def _maybe_compiled(fn: Callable, x: torch.Tensor) -> Callable:
    return _compiled(fn) if x.device.type == "cuda" else fn


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, bias)
        return _maybe_compiled(_bias_gelu_forward, x)(x, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, bias = ctx.saved_tensors
        grad_x = _maybe_compiled(_bias_gelu_backward, x)(grad, x, bias)
        return grad_x, grad_x.flatten(0, -2).sum(0).to(bias.dtype)


def _bias_gelu_forward(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    # In fp32 (bf16 inputs are upcast inside the region), as torch's gelu computes internally.
    return _gelu_tanh_forward(x.float() + bias.float()).to(x.dtype)


def _bias_gelu_backward(grad: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _gelu_tanh_backward(grad.float(), x.float() + bias.float()).to(x.dtype)


def fused_bias_gelu(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``gelu_tanh(x + bias)`` saving only ``x`` and ``bias`` for the backward."""
    if bias is None:
        return reference_bias_gelu(x, None)
    return _BiasGelu.apply(x, bias)


def reference_bias_dropout_add(x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor, p: float,
                               training: bool) -> torch.Tensor:
    """``residual + dropout(x + bias)`` as three PyTorch ops."""
    if bias is not None:
        x = x + bias
    return residual + F.dropout(x, p, training)


def fused_bias_dropout_add(x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor, p: float,
                           training: bool) -> torch.Tensor:
    """The same value; without dropout (BLOOM's setting, and evaluation) the bias and the
    residual are added in one fused ``add`` pass where a compiler runs, else eagerly."""
    if training and p > 0.0:
        # The mask must be F.dropout's own draw from the current stream (TP stream, recompute).
        return reference_bias_dropout_add(x, bias, residual, p, training)
    if bias is None:
        return residual + x
    return _maybe_compiled(_add3, x)(x, bias, residual)


def _add3(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return residual + (x + bias)


def reference_add_layer_norm(x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor,
                             weight: torch.Tensor, ln_bias: torch.Tensor,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = residual + (x + bias)`` and ``layer_norm(h)``, as the unfused block computes them."""
    total = residual + (x if bias is None else x + bias)
    return total, F.layer_norm(total, total.shape[-1:], weight, ln_bias, eps)


def fused_add_layer_norm(x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor,
                         weight: torch.Tensor, ln_bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same pair, computed in one compiled region where a compiler runs (CUDA), else eagerly."""
    return _maybe_compiled(reference_add_layer_norm, x)(x, bias, residual, weight, ln_bias, eps)
