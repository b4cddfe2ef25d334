"""FLOPs, throughput and MFU, with Megatron's accounting so figures compare with BLOOM's.

Per iteration of B sequences of length s through L layers of width h and vocabulary V,
Megatron counts the matrix multiplies of one forward as

    F = 24 B s L h^2 (1 + s / (6 h) + V / (16 L h))     [Narayanan et al., 2021, eq. 3 / 3]

(QKV, attention scores and values, output projection and MLP per layer: 24 B s h^2 + 4 B s^2 h;
the LM head: 2 B s h V). Backward costs twice the forward, so training costs 3F. With
activation recompute the forward runs twice: 4F. "Model FLOPs" (3F) measure useful work and
give MFU; "hardware FLOPs" (4F with recompute) are what the device executed, the figure
BLOOM-176B reported (about 150 TFLOP/s per A100).
"""

from __future__ import annotations

from typing import Optional

from megatron.config import ModelConfig


def flops_per_iteration(model: ModelConfig, padded_vocab_size: int, batch_size: int, recompute: bool) -> float:
    """Training FLOPs of one iteration over ``batch_size`` sequences (Megatron's formula)."""
    L, h, s, V = model.num_layers, model.hidden_size, model.seq_length, padded_vocab_size
    forward = 24.0 * batch_size * s * L * h * h * (1.0 + s / (6.0 * h) + V / (16.0 * L * h))
    return (4.0 if recompute else 3.0) * forward


def throughput(
    model: ModelConfig,
    padded_vocab_size: int,
    batch_size: int,
    seconds: float,
    world_size: int,
    recompute: bool,
    peak_flops_per_device: Optional[float] = None,
) -> dict[str, float]:
    """Samples/s, tokens/s, TFLOP/s per device (model and hardware) and MFU for one step."""
    seconds = max(seconds, 1e-9)
    model_flops = flops_per_iteration(model, padded_vocab_size, batch_size, recompute=False)
    hardware_flops = flops_per_iteration(model, padded_vocab_size, batch_size, recompute=recompute)
    out = {
        "samples-per-second": batch_size / seconds,
        "tokens-per-second": batch_size * model.seq_length / seconds,
        "tflops-per-device": model_flops / seconds / world_size / 1e12,
        "hardware-tflops-per-device": hardware_flops / seconds / world_size / 1e12,
    }
    if peak_flops_per_device:
        out["mfu"] = model_flops / seconds / world_size / peak_flops_per_device
    return out
