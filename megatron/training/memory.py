"""Per-rank memory estimate of a layout, for ``pretrain_bloom.py --dry-run``.

Counts per rank of pipeline stage p (TP size t, DP size d, micro-batch b, sequence s, hidden h,
heads a, vocabulary V):

- parameters: the stage's layers (first stage: embedding; last stage: final LN and its own
  copy of the tied embedding for the head); TP splits every matrix, the QKV/MLP biases and the
  embedding rows by t, LayerNorms and row-parallel biases are duplicated.
- weights: 2 bytes per parameter in bf16/fp16, 4 in fp32.
- gradients: 4 bytes per parameter (bf16 runs accumulate gradients in fp32, as BLOOM did).
- optimizer (ZeRO stage >= 1 shards it over DP): Adam's two moments in fp32 (8 bytes) plus, in
  bf16/fp16, the fp32 master weights (4 bytes), divided by d.
- activations (Korthikanti et al., 2022, bf16, per layer and micro-batch): s b h (10 + 24/t)
  bytes without sequence parallelism, s b h 34/t with it; the 5 a s^2 b term of stored attention
  probabilities is left out because the fused attention kernels never store them. With
  activation recompute a layer keeps only its input (2 s b h bytes, /t with sequence
  parallelism) plus, transiently, one layer's full activations. Under 1F1B, stage p holds
  min(PP - p, micro-batches) micro-batches in flight. The last stage adds its bf16 logits and
  their gradient (2 x 2 s b V/t bytes).

These are estimates: allocator fragmentation, communication buffers and temporary tensors come
on top (plan for 10-20% headroom).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron.config import Config
from megatron.model.layout import EMBEDDING_INDEX, full_shapes, layer_indices, layer_kind, lm_head_index, partition_dim
from megatron.model.pipeline import stage_partition

GB = 2**30


@dataclass(frozen=True)
class StageMemory:
    """Estimated bytes on one rank of a pipeline stage."""

    stage: int
    layers: str
    parameters: int
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        """Sum of the estimated parts."""
        return self.weights + self.gradients + self.optimizer + self.activations


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


def estimate_memory(cfg: Config, world_size: int) -> list[StageMemory]:
    """The estimate for one rank of every pipeline stage of this layout."""
    m, p, tr = cfg.model, cfg.parallel, cfg.training
    t, pp, d = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, cfg.data_parallel_size(world_size)
    s, b, h = m.seq_length, tr.micro_batch_size, m.hidden_size
    low_precision = tr.bf16 or tr.fp16
    weight_bytes = 2 if low_precision else 4
    optimizer_bytes = (12 if low_precision else 8) / (d if p.zero_stage >= 1 else 1)
    micro_batches = max(tr.global_batch_size // (b * d), 1)
    split = t if p.sequence_parallel else 1
    full_layer = s * b * h * (34 / t if p.sequence_parallel else 10 + 24 / t)
    stored_layer = 2 * s * b * h / split if tr.checkpoint_activations else full_layer
    stages = []
    for stage, (start, end) in enumerate(stage_partition(cfg)):
        params, blocks = _stage_parameters(cfg, start, end)
        in_flight = min(pp - stage, micro_batches)
        activations = blocks * stored_layer * in_flight + (full_layer if tr.checkpoint_activations and blocks else 0)
        if stage == pp - 1:
            activations += 2 * 2 * s * b * cfg.padded_vocab_size / t
        stages.append(StageMemory(stage, f"{start}-{end - 1}", params, params * weight_bytes, params * 4.0,
                                  params * optimizer_bytes, activations))
    return stages


def format_memory_table(stages: list[StageMemory]) -> str:
    """A plain-text table, GiB per rank."""
    header = (f"{'stage':>5} {'layers':>8} {'params/rank':>14} {'weights':>8} {'grads':>8} {'optim':>8} "
              f"{'activ':>8} {'total GiB':>10}")
    rows = [header]
    for st in stages:
        rows.append(f"{st.stage:>5} {st.layers:>8} {st.parameters:>14,} {st.weights / GB:>8.2f} "
                    f"{st.gradients / GB:>8.2f} {st.optimizer / GB:>8.2f} {st.activations / GB:>8.2f} "
                    f"{st.total / GB:>10.2f}")
    return "\n".join(rows)
