"""Megatron-style tensor parallelism: collectives with autograd, sharded layers, vocab-parallel
cross entropy and TP-aware random streams. Every function takes its process group explicitly;
``group=None`` (or a group of one rank) means no tensor parallelism."""

from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    SequenceParallelLayerNorm,
    VocabParallelEmbedding,
    check_tp_duplicates_in_sync,
    default_init_method,
    init_from_full,
    set_tensor_model_parallel_attributes,
    shard,
)
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.random import (
    MODEL_PARALLEL_RNG,
    RNGStatesTracker,
    dropout,
    initialize_rng,
    model_parallel_region,
    model_parallel_seed,
)

__all__ = [
    "ColumnParallelLinear", "RowParallelLinear", "SequenceParallelLayerNorm", "VocabParallelEmbedding",
    "check_tp_duplicates_in_sync", "default_init_method", "init_from_full",
    "set_tensor_model_parallel_attributes", "shard",
    "copy_to_tensor_model_parallel_region", "gather_from_sequence_parallel_region",
    "gather_from_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
    "reduce_scatter_to_sequence_parallel_region", "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_model_parallel_region",
    "vocab_parallel_cross_entropy",
    "MODEL_PARALLEL_RNG", "RNGStatesTracker", "dropout", "initialize_rng", "model_parallel_region",
    "model_parallel_seed",
]
