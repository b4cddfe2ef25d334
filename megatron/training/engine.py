"""Builds the DeepSpeed engine from our config; the DeepSpeed JSON is generated, never hand-written.

What DeepSpeed does for us: ZeRO sharding of optimizer state (stage 1 as BLOOM; 2 and 3 when
there is no pipeline), bf16 training with fp32 master weights and fp32 gradient accumulation,
gradient clipping, data-parallel gradient reduction, and the detection of non-finite
gradients: ZeRO's optimizers skip such a step and count it in ``engine.skipped_steps``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from megatron.config import Config
from megatron.model.kernels import select_adam

if TYPE_CHECKING:  # deepspeed is imported where an engine is built, not when this module loads
    from deepspeed.runtime.engine import DeepSpeedEngine


# ZeRO-1/2's gradient reduction bucket (elements); also its all-gather bucket. The planner
# (megatron/training/memory.py) counts this buffer: 2 GB in fp32.
REDUCE_BUCKET_ELEMENTS = 500_000_000


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay for weight matrices, none for biases, LayerNorms (and 1-d params)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() < 2 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def deepspeed_config(cfg: Config, data_parallel_size: int, global_batch_size: int, on_gpu: bool,
                     load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed configuration dict for this run, at the given (possibly ramping) batch size.

    ``load_universal``: the engine will load a universal checkpoint (resume on another layout,
    see megatron/checkpoint/universal.py).
    """
    t, o = cfg.training, cfg.optimizer
    micro = t.micro_batch_size
    ds: dict[str, Any] = {
        "train_batch_size": global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": global_batch_size // (micro * data_parallel_size),
        "gradient_clipping": o.clip_grad,
        "zero_optimization": {
            "stage": cfg.parallel.zero_stage,
            "contiguous_gradients": True,
            "overlap_comm": on_gpu,
            "reduce_bucket_size": REDUCE_BUCKET_ELEMENTS,
            "allgather_bucket_size": REDUCE_BUCKET_ELEMENTS,
        },
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": [o.adam_beta1, o.adam_beta2],
                "eps": o.adam_eps,
                "weight_decay": o.weight_decay,
                **select_adam(o, "cuda" if on_gpu else "cpu").fn(),
            },
        },
        "bf16": {"enabled": t.bf16},
        "fp16": {"enabled": t.fp16, "loss_scale": 0, "initial_scale_power": 12},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.parallel.sequence_parallel and cfg.parallel.tensor_model_parallel_size > 1:
        # The pipeline engine splits activations over TP for the trip between stages, assuming
        # every TP rank holds the same tensor; under sequence parallelism each holds its own
        # chunk already, so that split would send the wrong data.
        ds["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    if t.bf16:
        # BLOOM accumulated bf16 gradients in fp32 across micro-batches.
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return ds


def build_engine(cfg: Config, model: nn.Module, data_parallel_size: int, global_batch_size: int,
                 mpu: Optional[Any] = None, load_universal: bool = False) -> DeepSpeedEngine:
    """``deepspeed.initialize`` with our generated config and parameter groups."""
    import deepspeed

    on_gpu = torch.cuda.is_available()
    ds_config = deepspeed_config(cfg, data_parallel_size, global_batch_size, on_gpu, load_universal)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model, cfg.optimizer.weight_decay),
        config=ds_config,
        mpu=mpu,
    )
    return engine


def set_learning_rate(engine: DeepSpeedEngine, lr: float) -> None:
    """Set the rate of every parameter group for the coming step (our schedule, not DeepSpeed's)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
