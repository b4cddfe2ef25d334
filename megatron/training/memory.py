"""Memory per rank of every pipeline stage of a layout: what ``pretrain_bloom.py --dry-run`` and
``tools/plan.py`` print. Device constants (CUDA context, allocator fragmentation, DeepSpeed's
buffer sizes) come from megatron/planning/hardware.py; parameter counts from
megatron/model/layout.py; the pipeline partition from megatron/model/pipeline.py.

For stage p (TP size t, DP size d, micro-batch b, sequence s, hidden h, heads a, padded
vocabulary V, P parameters on the rank, m micro-batches per iteration):

State that lives through the iteration (DeepSpeed's optimizers, as megatron/training/engine.py
configures them):
- weights: 2 bytes per parameter in bf16/fp16, 4 in fp32.
- gradients: 4 bytes per parameter: bf16 runs accumulate in fp32 (BF16_Optimizer's flat fp32
  gradient buffer), fp32 runs keep ``param.grad``.
- low-precision gradients: bf16 runs also keep each parameter's bf16 ``.grad`` (BF16_Optimizer
  zeroes it after copying into the fp32 buffer, it does not free it): 2 bytes per parameter.
- optimizer: Adam's two fp32 moments (8 bytes) plus an fp32 master copy (4 bytes; DeepSpeed's
  ZeRO optimizer clones one even for fp32 parameters), divided by d for ZeRO stage >= 1.

Activations (Korthikanti et al., 2022, "Reducing Activation Recomputation in Large Transformer
Models", scaled from their 2-byte to the run's activation bytes): a layer keeps
s b h (10 + 24/t) without sequence parallelism and s b h 34/t with it, minus the two 1-byte
dropout masks (s b h) when hidden dropout is 0. The 5 a s^2 b / t of stored attention scores
only with a kernel that materialises them (``attention="materialized"``: Megatron-DeepSpeed's
fused scale-mask-softmax, which BLOOM-176B ran); our kernels (flash-attn, FlexAttention, SDPA
per query block) keep O(s) per head. With activation recompute a layer keeps only its input
(2 s b h, /t with sequence parallelism), and the backward rebuilds one layer at a time (its
full activations and their gradients are the working set). Under 1F1B stage p holds
min(PP - p, m) micro-batches in flight (DeepSpeed's ``num_pipe_buffers``), each with the
stage's output kept for its backward. The first stage also keeps the embedding's output, the
last the final LayerNorm's input and output and the LM head's buffers: the fused linear +
cross-entropy keeps one chunk of fp32 logits (megatron/model/kernels/linear_cross_entropy.py),
the chunked loss the [s b, V/t] logits and their gradient (one buffer for both in fp32 at
TP=1 on CPU), the reference (and Megatron-DeepSpeed's vocab-parallel loss) also an fp32 copy.

Transient buffers, which peak at different moments, so the peak takes the largest phase:
- backward: stored activations + working set + the LM head's buffers (+ ZeRO's reduction
  bucket of ``reduce_bucket_size`` elements in fp32: allocated as the backward starts);
- gradient reduction (after the last backward): the engine's flat all-reduce buffer for bf16
  (up to 5e8 elements), or, with a pipeline in fp32, a second ZeRO bucket next to the first;
- optimizer step: ZeRO's flat fp32 gradient partition (4 P / d).

On a GPU the caching allocator reserves more than the peak of live tensors (fragmentation,
a fraction of reserved memory), and the CUDA context and NCCL's buffers come on top: the sum is
what ``nvidia-smi`` shows. The "cpu" profile has neither.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from megatron.config import Config
from megatron.model.layout import EMBEDDING_INDEX, full_shapes, layer_indices, layer_kind, lm_head_index, partition_dim
from megatron.model.pipeline import stage_partition

GB = 2**30

# The LM head implementations of megatron/model/kernels (and Megatron-DeepSpeed's vocab-parallel
# cross entropy, which keeps what "reference" keeps).
HEAD_KERNELS = ("fused_linear", "chunked", "reference")
ATTENTION_KERNELS = ("flash", "materialized")


@dataclass(frozen=True)
class Kernels:
    """Which attention and LM-head kernels the planned run uses (they change memory and time),
    and, for 2022's software, what its pipeline engine sent between stages."""

    attention: str = "flash"  # "flash": O(s) per head kept (ours); "materialized": [a/t, s, s] scores
    head: str = "fused_linear"  # one of HEAD_KERNELS
    # DeepSpeed's PipelineEngine under Megatron-DeepSpeed 2022 sent the causal mask with every
    # micro-batch's activations (megatron/planning/hardware.py, [MDS22]); our pipeline does not.
    pipeline_sends_mask: bool = False
    # ALiBi's bias enters the materialised scores (BLOOM); False for a model with learned or
    # rotary positions, such as GPT-3 under Megatron-LM (the planner's out-of-sample check).
    alibi: bool = True
    # Bytes per parameter moved after each micro-batch to accumulate its gradients in low
    # precision runs; None: BF16_Optimizer's (megatron/planning/hardware.py).
    grad_accumulation_bytes: Optional[float] = None

    @classmethod
    def for_device(cls, cfg: Config, device_type: str) -> "Kernels":
        """What megatron/model/kernels picks for this config on ``device_type`` ("cuda"/"cpu")."""
        from megatron.model.kernels import select_kernels

        chosen = select_kernels(cfg.model, device_type)
        attention = "materialized" if chosen.attention.name in ("reference", "sdpa_mask") else "flash"
        return cls(attention=attention, head=chosen.cross_entropy.name)


# BLOOM-176B's own software (Megatron-DeepSpeed, 2022): fused scale-mask-softmax attention and
# the vocab-parallel cross entropy over full logits.
MEGATRON_DEEPSPEED_2022 = Kernels(attention="materialized", head="reference", pipeline_sends_mask=True)
# Megatron-LM's own GPT runs (2021-2022): the same fused softmax and vocab-parallel cross
# entropy, learned positions (no ALiBi), and its own pipeline schedule (no mask sent along).
# Its fp16 gradients are added into an fp16 ``main_grad`` by a hook after each backward
# (read 2 + 2, write 2 bytes per parameter: ``param.main_grad.add_(param.grad.data)`` in
# NVIDIA/Megatron-LM 2021, megatron/model/distributed.py, ``_make_param_hook``, with
# --accumulate-allreduce-grads-in-fp32 off: examples/pretrain_gpt3_175B.sh does not set it).
MEGATRON_LM_GPT = Kernels(attention="materialized", head="reference", alibi=False, grad_accumulation_bytes=6)


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one rank of a pipeline stage, by part."""

    stage: int
    layers: str
    parameters: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    low_precision_gradients: float = 0.0
    working_set: float = 0.0  # one layer's recompute/backward buffers
    logits: float = 0.0
    attention: float = 0.0  # stored and transient attention scores (materialising kernels only)
    communication: float = 0.0  # the largest transient buffer outside the backward (reduction/step)
    communication_in_backward: float = 0.0  # ZeRO's bucket when allocated before the backward
    context: float = 0.0  # CUDA context + NCCL (device profile)
    fragmentation: float = 0.0  # allocator cache beyond the peak of live tensors
    in_flight: int = 1

    @property
    def states(self) -> float:
        """Weights, gradients and optimizer state: alive all iteration."""
        return self.weights + self.gradients + self.low_precision_gradients + self.optimizer

    @property
    def peak_allocated(self) -> float:
        """Peak of live tensor bytes: the states plus the largest transient phase."""
        backward = (self.activations + self.working_set + self.logits + self.attention
                    + self.communication_in_backward)
        return self.states + max(backward, self.communication)

    @property
    def total(self) -> float:
        """What the device shows in use: peak live tensors, allocator cache and context."""
        return self.peak_allocated + self.fragmentation + self.context


def _layer_parameters(cfg: Config, index: int) -> int:
    """Parameters one TP rank holds of the layer at pipeline ``index``."""
    t = cfg.parallel.tensor_model_parallel_size
    shapes = full_shapes(cfg.model, cfg.padded_vocab_size, index)
    return sum(math.prod(shape) // (t if partition_dim(key) is not None else 1) for key, shape in shapes.items())


def _stage_parameters(cfg: Config, start: int, end: int) -> tuple[int, int]:
    """(parameters per TP rank, transformer blocks) of pipeline layers [start, end)."""
    num_layers = cfg.model.num_layers
    count, blocks = 0, 0
    for index in range(start, end):
        if index == lm_head_index(num_layers):
            # The tied head: a copy of the embedding when the embedding lives on another stage.
            count += _layer_parameters(cfg, EMBEDDING_INDEX) if start > EMBEDDING_INDEX else 0
        elif index in layer_indices(num_layers):
            count += _layer_parameters(cfg, index)
            blocks += layer_kind(index, num_layers) == "block"
    return count, blocks


_STAGE_CACHE: dict[tuple, list[tuple[int, int, int, int]]] = {}


def stage_layers(cfg: Config) -> list[tuple[int, int, int, int]]:
    """(start, end, parameters per TP rank, blocks) of every pipeline stage (memoised: a layout
    search asks for the same model and split thousands of times)."""
    m = cfg.model
    key = (m.num_layers, m.hidden_size, m.ffn_size, m.embed_layernorm, cfg.padded_vocab_size,
           cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
           cfg.parallel.pp_partition_method)
    if key not in _STAGE_CACHE:
        _STAGE_CACHE[key] = [(start, end, *_stage_parameters(cfg, start, end)) for start, end in stage_partition(cfg)]
    return _STAGE_CACHE[key]


def micro_batches(cfg: Config, data_parallel_size: int) -> int:
    """Micro-batches per iteration and DP rank (at the full global batch)."""
    tr = cfg.training
    return max(tr.global_batch_size // (tr.micro_batch_size * data_parallel_size), 1)


def _head_bytes(cfg: Config, kernels: Kernels, act_bytes: int, device_type: str = "cpu") -> float:
    """LM head buffers on the last stage beyond its input: logits, their fp32 copy, gradient."""
    import torch

    from megatron.model.kernels.linear_cross_entropy import default_chunk_tokens, logits_in_place

    t = cfg.parallel.tensor_model_parallel_size
    tokens = cfg.model.seq_length * cfg.training.micro_batch_size
    columns = cfg.padded_vocab_size // t
    if kernels.head == "fused_linear":
        chunk = min(tokens, default_chunk_tokens(columns))
        return chunk * columns * (4 + act_bytes)  # one fp32 chunk (+ its low-precision copy)
    logits = tokens * columns * act_bytes
    if kernels.head == "chunked":
        # Logits kept for the backward, and their gradient; in fp32 at TP=1 on CPU one buffer
        # holds both in turn (the log-probabilities, then the gradient, written in place).
        one_buffer = act_bytes == 4 and logits_in_place(device_type, torch.float32, t)
        return logits if one_buffer else 2 * logits
    return 2 * logits + 2 * tokens * columns * 4  # + the fp32 copy and its softmax/gradient


def estimate_memory(cfg: Config, world_size: int, device=None, kernels: Optional[Kernels] = None) -> list[StageMemory]:
    """The memory of one rank of every pipeline stage of this layout.

    ``device``: a megatron.planning.hardware.DeviceProfile (context and fragmentation; None: the
    "cpu" profile, which has neither); ``kernels``: the attention/head kernels (None: what
    megatron/model/kernels picks on that device)."""
    from megatron.planning import hardware

    device = device or hardware.DEVICES["cpu"]
    device_type = "cpu" if device.name == "cpu" else "cuda"
    kernels = kernels or Kernels.for_device(cfg, device_type)
    m, p, tr = cfg.model, cfg.parallel, cfg.training
    t, pp, d = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, cfg.data_parallel_size(world_size)
    s, b, h, a = m.seq_length, tr.micro_batch_size, m.hidden_size, m.num_attention_heads
    low_precision = tr.bf16 or tr.fp16
    weight_bytes = act_bytes = 2 if low_precision else 4
    scale = act_bytes / 2  # Korthikanti et al. count 2-byte activations (1-byte masks)
    optimizer_bytes = (12 if low_precision or p.zero_stage >= 1 else 8) / (d if p.zero_stage >= 1 else 1)
    m_batches = micro_batches(cfg, d)
    sp = p.sequence_parallel and t > 1
    masks = 0 if m.hidden_dropout == 0 else 2  # the two hidden-dropout masks, s b h bytes together
    sbh = s * b * h
    full_layer = scale * sbh * ((34 - masks) / t if sp else (10 - masks) + 24 / t)
    scores = 0.0
    if kernels.attention == "materialized":  # softmax output (+ dropout mask and output) per layer
        scores = scale * a * s * s * b / t * (5 if m.attention_dropout > 0 else 2)
    layer_input = act_bytes * sbh / (t if sp else 1)
    stored_layer = layer_input if tr.checkpoint_activations else full_layer
    stages = []
    for stage, (start, end, params, blocks) in enumerate(stage_layers(cfg)):
        in_flight = min(pp - stage, m_batches)
        per_micro_batch = blocks * stored_layer + layer_input  # + the stage's output, kept by the engine
        if stage == 0:
            per_micro_batch += layer_input  # the embedding's output (the embedding LayerNorm's input)
        if stage == pp - 1:
            per_micro_batch += 2 * layer_input  # final LayerNorm input and output (the head's input)
        activations = in_flight * per_micro_batch
        # The backward of one layer: its activations (recomputed or stored) and their gradients.
        working_set = (full_layer + 2 * layer_input) if blocks else 0.0
        logits = _head_bytes(cfg, kernels, act_bytes, device_type) if stage == pp - 1 else 0.0
        # Materialised attention scores: kept by every stored layer, or by the one being
        # recomputed; plus their gradient while that layer's backward runs.
        kept_scores = (1 if tr.checkpoint_activations else in_flight * blocks) * scores if blocks else 0.0
        attention = kept_scores + (scores if blocks else 0.0)
        lp_grads = 2.0 * params if low_precision else 0.0
        comm, comm_backward = _communication_buffers(cfg, params, d, pp, low_precision, hardware)
        # ZeRO-2 keeps only this rank's gradient partition after the reduction; ZeRO-3 also its
        # weight partition (gathered layer by layer, a transient the working set covers).
        grad_bytes = 4.0 / d if p.zero_stage >= 2 else 4.0
        weights = params * weight_bytes / (d if p.zero_stage == 3 else 1)
        context = device.context_bytes + (_nccl_bytes(t, pp, d, hardware) if device.context_bytes else 0.0)
        st = StageMemory(stage, f"{start}-{end - 1}", params, weights, params * grad_bytes, params * optimizer_bytes,
                         activations, lp_grads, working_set, logits, attention, comm, comm_backward, context,
                         in_flight=in_flight)
        # The caching allocator reserves peak / (1 - f) when a fraction f of what it holds is
        # fragmented.
        fragmentation = st.peak_allocated * device.fragmentation / (1 - device.fragmentation)
        stages.append(dataclasses.replace(st, fragmentation=fragmentation))
    return stages


def _communication_buffers(cfg: Config, params: int, d: int, pp: int, low_precision: bool, hw) -> tuple[float, float]:
    """(largest buffer after the backward, buffer alive during the backward), bytes.

    DeepSpeed's paths (megatron/planning/hardware.py [DS]): bf16 gradients (BF16_Optimizer) are
    all-reduced over DP through a flat fp32 buffer of up to 5e8 elements; fp32 ZeRO-1/2 stages
    gradients in a ``reduce_bucket_size`` bucket allocated as the backward starts, plus a second
    one at the reduction under a pipeline. ZeRO's step then flattens this rank's fp32 gradient
    partition (4 P / d)."""
    zero = cfg.parallel.zero_stage
    if low_precision:  # BF16_Optimizer: the engine's buffered all-reduce, with or without a pipeline
        reduce = 4.0 * min(params, hw.PIPELINE_ALLREDUCE_ELEMENTS) if d > 1 else 0.0
        return reduce, 0.0
    if zero in (1, 2) and not low_precision:
        from megatron.training.engine import REDUCE_BUCKET_ELEMENTS

        bucket = 4.0 * REDUCE_BUCKET_ELEMENTS
        step = 4.0 * params / d
        # The gradient hooks allocate one bucket as the backward starts; with a pipeline,
        # ``reduce_gradients(pipeline_parallel=True)`` appends a second one for the reduction
        # while the first is still held (measured: tests/test_planner_cpu_memory.py).
        return (max(2 * bucket, step), bucket) if pp > 1 else (step, bucket)
    return 0.0, 0.0


def _nccl_bytes(t: int, pp: int, d: int, hw) -> float:
    """NCCL's buffers: one set per communicator this rank is in (TP, DP, the two pipeline
    neighbours, the tied-embedding group, the world) [NCCL]."""
    communicators = 1 + (t > 1) + (d > 1) + 2 * (pp > 1) + (pp > 1)
    return communicators * hw.NCCL_BYTES_PER_COMMUNICATOR


def format_memory_table(stages: list[StageMemory]) -> str:
    """A plain-text table, GiB per rank."""
    header = (f"{'stage':>5} {'layers':>8} {'params/rank':>14} {'weights':>8} {'grads':>8} {'optim':>8} "
              f"{'activ':>8} {'buffers':>8} {'ctx+frag':>8} {'total GiB':>10}")
    rows = [header]
    for st in stages:
        buffers = st.peak_allocated - st.states - st.activations
        rows.append(f"{st.stage:>5} {st.layers:>8} {st.parameters:>14,} {st.weights / GB:>8.2f} "
                    f"{(st.gradients + st.low_precision_gradients) / GB:>8.2f} {st.optimizer / GB:>8.2f} "
                    f"{st.activations / GB:>8.2f} {buffers / GB:>8.2f} {(st.context + st.fragmentation) / GB:>8.2f} "
                    f"{st.total / GB:>10.2f}")
    return "\n".join(rows)
