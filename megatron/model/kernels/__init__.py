"""The kernel registry: every fused kernel has a plain PyTorch reference, and the implementation
each kernel runs is chosen once per device when the model is built.

    kernels = select_kernels(cfg.model, "cuda")   # Kernels: one KernelChoice per kernel
    kernels.attention.fn(q, k, v, slopes, dropout_p)
    print(kernels.describe())                      # what was chosen, and why

The switches are Megatron's where Megatron has one (``model.bias_gelu_fusion``,
``model.bias_dropout_fusion``, ``model.masked_softmax_fusion``, Megatron-core's
``model.cross_entropy_loss_fusion``), plus ``model.layernorm_fusion``, ``model.attention_implementation`` (``auto`` or a
name below) and ``model.use_fused_kernels``, which turns every kernel to its reference at once
(debugging, kernel tests). ``auto`` picks per device; a named implementation the device cannot
run is refused with the reason, as Megatron-DeepSpeed's
``--abort-on-unmet-fused-kernel-constraints`` does, instead of silently running another one.

Kernels and implementations:
    attention         reference (fp32 matmuls), sdpa_mask (SDPA with the full [heads, s, s]
                      ALiBi + causal mask), sdpa_chunked (SDPA per query block, that block's bias
                      only), flex (FlexAttention; CUDA), flash (flash-attn; CUDA): see
                      megatron/model/kernels/attention
    cross_entropy     the LM head and its loss, (hidden, weight, labels, tp_group) -> per-token losses:
                      reference (logits, then an fp32 copy), chunked (logits, then a cross entropy
                      without the copy), fused_linear (token chunks: no [tokens, vocab] logits, at
                      the cost of recomputing them in the backward)
    bias_gelu         reference (add, then torch's gelu), fused (one region, analytic backward)
    bias_dropout_add  reference (three ops), fused (one region without dropout)
    add_layer_norm    the residual add + the LayerNorm after it, (x, bias, residual, weight,
                      ln_bias, eps) -> (sum, normalised): reference (two ops), fused (one region;
                      without hidden dropout, whose mask comes between the two)

The optimizer's AdamW is chosen here too (``optimizer.adam_implementation``), as the parameters
DeepSpeed builds it from: torch's ``fused=True`` kernel (CPU and CUDA), its multi-tensor
``foreach`` one, its per-parameter loop (what torch runs on CPU by default), or DeepSpeed's
CUDA FusedAdam (Megatron-DeepSpeed's).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch

from megatron.config import ModelConfig, OptimizerConfig
from megatron.model.kernels import attention, elementwise, linear_cross_entropy

# A device the implementation cannot serve, with this model config and compute dtype: the
# reason, else None.
Unavailable = Callable[[str, ModelConfig, torch.dtype], Optional[str]]


def _anywhere(device_type: str, cfg: object, dtype: Optional[torch.dtype]) -> Optional[str]:
    return None


def _attention_unavailable(name: str) -> Unavailable:
    def unavailable(device_type: str, cfg: ModelConfig, dtype: torch.dtype) -> Optional[str]:
        return attention.unavailable_reason(name, device_type, dtype, cfg.attention_dropout, cfg.head_dim)

    return unavailable


@dataclass(frozen=True)
class Implementation:
    """One implementation of a kernel and the condition under which it can run."""

    fn: Callable
    unavailable: Unavailable = _anywhere


IMPLEMENTATIONS: dict[str, dict[str, Implementation]] = {
    "attention": {name: Implementation(fn, _attention_unavailable(name))
                  for name, fn in attention.ATTENTION_IMPLEMENTATIONS.items()},
    "cross_entropy": {
        "reference": Implementation(linear_cross_entropy.reference_linear_cross_entropy),
        "chunked": Implementation(linear_cross_entropy.chunked_logits_cross_entropy),
        "fused_linear": Implementation(linear_cross_entropy.fused_linear_cross_entropy),
    },
    "bias_gelu": {
        "reference": Implementation(elementwise.reference_bias_gelu),
        "fused": Implementation(elementwise.fused_bias_gelu),
    },
    "bias_dropout_add": {
        "reference": Implementation(elementwise.reference_bias_dropout_add),
        "fused": Implementation(elementwise.fused_bias_dropout_add),
    },
    "add_layer_norm": {
        "reference": Implementation(elementwise.reference_add_layer_norm),
        "fused": Implementation(elementwise.fused_add_layer_norm),
    },
}


@dataclass(frozen=True)
class KernelChoice:
    """The implementation one kernel runs, and why it was chosen."""

    kernel: str
    name: str
    reason: str
    fn: Callable


@dataclass(frozen=True)
class Kernels:
    """The implementation of every kernel for one model on one device."""

    attention: KernelChoice
    cross_entropy: KernelChoice
    bias_gelu: KernelChoice
    bias_dropout_add: KernelChoice
    add_layer_norm: KernelChoice

    def describe(self) -> str:
        """One line: ``kernels: attention=sdpa_mask (auto on cpu), ...``."""
        parts = [f"{c.kernel}={c.name} ({c.reason})" for c in (getattr(self, f.name) for f in fields(self))]
        return "kernels: " + ", ".join(parts)


def _choice(kernel: str, name: str, reason: str, device_type: str, cfg: ModelConfig, field: str,
            dtype: torch.dtype) -> KernelChoice:
    if name not in IMPLEMENTATIONS[kernel]:
        raise ValueError(f"model.{field}: {name!r} is not an implementation of {kernel}; choose auto or one of "
                         f"{sorted(IMPLEMENTATIONS[kernel])}")
    implementation = IMPLEMENTATIONS[kernel][name]
    refused = implementation.unavailable(device_type, cfg, dtype)
    if refused:
        raise ValueError(f"model.{field}: {kernel} implementation {name!r} cannot run here: {refused}; set "
                         f"model.{field} to auto or another implementation")
    return KernelChoice(kernel, name, reason, implementation.fn)


# Where the LM head + loss is worth fusing: it saves the logits' memory (82x at bloom-560m's
# shape, bench/README.md) but recomputes the head matmul in the backward, about +12% of a CPU
# step's matmuls at the bench's shape, where memory is plentiful and time is the matmuls.
_FUSED_HEAD_DEVICES = ("cuda",)
# Where each fused elementwise kernel is worth running. On CPU a step is matmul-bound (bench/README.md,
# "One training step against transformers"), so torch's eager elementwise ops cost next to nothing
# there, and compiling them would cost every run and test its compile time.
_ELEMENTWISE_DEVICES = ("cuda",)


def _switch(kernel: str, enabled: bool, field: str, device_type: str, cfg: ModelConfig, dtype: torch.dtype,
            fused: str, devices: Optional[tuple[str, ...]] = None,
            unfused: tuple[str, str] = ("reference", "eager")) -> KernelChoice:
    """``fused`` when the switch is on (and, with ``devices``, on one of them), else the reference;
    off ``devices``, ``unfused`` = (implementation, a word on why)."""
    if not cfg.use_fused_kernels:
        return _choice(kernel, "reference", "model.use_fused_kernels=false", device_type, cfg, field, dtype)
    if not enabled:
        return _choice(kernel, "reference", f"model.{field}=false", device_type, cfg, field, dtype)
    if devices is not None and device_type not in devices:
        fallback, why = unfused
        return _choice(kernel, fallback, f"{why} on {device_type}: the step is matmul-bound there", device_type,
                       cfg, field, dtype)
    return _choice(kernel, fused, f"model.{field}=true", device_type, cfg, field, dtype)


def select_kernels(cfg: ModelConfig, device_type: str, dtype: torch.dtype = torch.float32) -> Kernels:
    """Every kernel's implementation for ``cfg`` on a ``device_type`` (``"cpu"``, ``"cuda"``)
    device computing in ``dtype`` (the run's precision: flash-attn needs bf16 or fp16); raises
    ValueError naming the config field when a requested one cannot run."""
    field = "attention_implementation"
    if cfg.attention_implementation == "auto" and not (cfg.use_fused_kernels and cfg.masked_softmax_fusion):
        why = "model.use_fused_kernels=false" if not cfg.use_fused_kernels else "model.masked_softmax_fusion=false"
        attention_choice = _choice("attention", "reference", why, device_type, cfg, field, dtype)
    elif cfg.attention_implementation == "auto":
        name, why = attention.choose_attention("auto", device_type, dtype, cfg.attention_dropout, cfg.head_dim)
        attention_choice = _choice("attention", name, why, device_type, cfg, field, dtype)
    else:
        attention_choice = _choice("attention", cfg.attention_implementation, "model.attention_implementation",
                                   device_type, cfg, field, dtype)
    return Kernels(
        attention=attention_choice,
        cross_entropy=_switch("cross_entropy", cfg.cross_entropy_loss_fusion, "cross_entropy_loss_fusion",
                              device_type, cfg, dtype, "fused_linear", _FUSED_HEAD_DEVICES,
                              ("chunked", "logits kept, no recompute")),
        bias_gelu=_switch("bias_gelu", cfg.bias_gelu_fusion, "bias_gelu_fusion", device_type, cfg, dtype, "fused",
                          _ELEMENTWISE_DEVICES),
        bias_dropout_add=_switch("bias_dropout_add", cfg.bias_dropout_fusion, "bias_dropout_fusion", device_type,
                                 cfg, dtype, "fused", _ELEMENTWISE_DEVICES),
        add_layer_norm=_add_layer_norm_choice(cfg, device_type, dtype),
    )


def _add_layer_norm_choice(cfg: ModelConfig, device_type: str, dtype: torch.dtype) -> KernelChoice:
    # Hidden dropout draws its mask between the branch and the residual add: nothing to fuse.
    if cfg.layernorm_fusion and cfg.use_fused_kernels and cfg.hidden_dropout > 0.0:
        return _choice("add_layer_norm", "reference", f"model.hidden_dropout={cfg.hidden_dropout}: the dropout mask "
                       "comes between the add and the LayerNorm", device_type, cfg, "layernorm_fusion", dtype)
    return _switch("add_layer_norm", cfg.layernorm_fusion, "layernorm_fusion", device_type, cfg, dtype, "fused",
                   _ELEMENTWISE_DEVICES)


def _needs_cuda(device_type: str, cfg: object, dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if device_type == "cuda" else f"DeepSpeed's FusedAdam is a CUDA kernel and the device is {device_type}"


# What DeepSpeed's "AdamW" optimizer section needs for each implementation ("torch_adam": build
# torch.optim.AdamW with the remaining keys as its arguments).
ADAM_IMPLEMENTATIONS: dict[str, Implementation] = {
    "torch_fused": Implementation(lambda: {"torch_adam": True, "fused": True}),
    "torch_foreach": Implementation(lambda: {"torch_adam": True, "foreach": True}),
    "torch_for_loop": Implementation(lambda: {"torch_adam": True, "foreach": False}),
    "deepspeed_fused": Implementation(lambda: {"torch_adam": False}, _needs_cuda),
}


def select_adam(cfg: OptimizerConfig, device_type: str) -> KernelChoice:
    """The AdamW implementation on ``device_type``; ``fn()`` gives its DeepSpeed optimizer params.
    ``auto``: DeepSpeed's FusedAdam on CUDA (Megatron-DeepSpeed's), torch's fused kernel elsewhere."""
    name, reason = cfg.adam_implementation, "optimizer.adam_implementation"
    if name == "auto":
        name, reason = ("deepspeed_fused" if device_type == "cuda" else "torch_fused"), f"auto on {device_type}"
    if name not in ADAM_IMPLEMENTATIONS:
        raise ValueError(f"optimizer.adam_implementation: {name!r} is not an AdamW implementation; choose auto or "
                         f"one of {sorted(ADAM_IMPLEMENTATIONS)}")
    refused = ADAM_IMPLEMENTATIONS[name].unavailable(device_type, cfg, None)
    if refused:
        raise ValueError(f"optimizer.adam_implementation: {name!r} cannot run here: {refused}; set it to auto or "
                         "a torch_* implementation")
    return KernelChoice("adamw", name, reason, ADAM_IMPLEMENTATIONS[name].fn)


def implementation(kernel: str, name: str) -> Callable:
    """The function of implementation ``name`` of ``kernel`` (tests and benchmarks)."""
    try:
        return IMPLEMENTATIONS[kernel][name].fn
    except KeyError:
        known = {k: sorted(v) for k, v in IMPLEMENTATIONS.items()}
        raise KeyError(f"unknown kernel implementation {kernel}/{name}; known: {known}") from None


def kernel_names() -> list[str]:
    """Names of every registered kernel."""
    return sorted(IMPLEMENTATIONS)
