"""BLOOM as a DeepSpeed ``PipelineModule``, with Megatron-DeepSpeed's layer list and indices.

    index 0        identity          (Megatron-DeepSpeed: cast to fp16)
    index 1        EmbeddingPipe     tied with the LM head ("embed")
    index 2        identity          (Megatron-DeepSpeed: [b, s] -> [s, b] transpose)
    index 3..L+2   TransformerLayerPipe x L
    index L+3      identity          (Megatron-DeepSpeed: transpose back)
    index L+4      FinalLayerNormPipe
    index L+5      EmbeddingPipe again, as the LM head (saved with index 1)

The LM head's matmul runs inside DeepSpeed's ``loss_fn``, which the last stage calls on the
last layer's output: the head layer hands over the hidden state, and ``loss_fn`` applies the
registry's LM head + loss (``cross_entropy``) to it with that layer's tied weight, so the
pipeline, like the single-stage model, never forms the [tokens, vocab] logits when the fused
kernel is chosen. The weight's gradient accumulates in the tied parameter as the logits' did,
and DeepSpeed's tied-weight all-reduce then joins it with the first stage's.

The identity entries are kept only so the layer indices, and therefore the checkpoint file
names (``layer_01``, ``layer_03``..., ``layer_{L+4}``), are BLOOM's own. Class names matter:
the partition method ``type:transformer|embedding`` balances the layers whose class name
matches, so BLOOM-176B's 70 blocks + 2 embeddings split 6 per stage over 12 stages.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.config import Config
from megatron.core.tensor_parallel import SequenceParallelLayerNorm
from megatron.model.bloom import BloomBlock, BloomEmbedding, lm_head_loss
from megatron.model.kernels import Kernels, select_kernels
from megatron.model.layout import EMBEDDING_INDEX, TIED_EMBEDDING_KEY, block_index, final_layernorm_index, lm_head_index


class EmbeddingPipe(BloomEmbedding):
    """The embedding stage; as the last layer it holds the tied weight the loss's LM head uses."""


class TransformerLayerPipe(BloomBlock):
    """One block; a pipeline layer of its own (and the unit of activation checkpointing)."""


class FinalLayerNormPipe(SequenceParallelLayerNorm):
    """The final LayerNorm as a pipeline layer (state dict keys ``weight``, ``bias``)."""


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _lm_head(module: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    # The head's matmul belongs to the loss (module docstring): hand the hidden state over.
    return hidden


def layer_specs(cfg: Config, tp_group=None, seed: int = 0, rng_tracker=None, kernels: Optional[Kernels] = None) -> list:
    """The spec list of BLOOM's pipeline (see the module docstring for the indices)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    m, sp = cfg.model, cfg.parallel.sequence_parallel
    embedding = dict(cfg=m, padded_vocab_size=cfg.padded_vocab_size, tp_group=tp_group, sequence_parallel=sp, seed=seed,
                     rng_tracker=rng_tracker)
    specs: list = [_identity] * (lm_head_index(m.num_layers) + 1)
    specs[EMBEDDING_INDEX] = TiedLayerSpec(TIED_EMBEDDING_KEY, EmbeddingPipe, **embedding,
                                           tied_weight_attr="word_embeddings.weight")
    for i in range(m.num_layers):
        specs[block_index(i)] = LayerSpec(TransformerLayerPipe, m, i, tp_group, sp, seed, rng_tracker, kernels)
    specs[final_layernorm_index(m.num_layers)] = LayerSpec(FinalLayerNormPipe, m.hidden_size, m.layernorm_epsilon,
                                                           tp_group, sp)
    specs[lm_head_index(m.num_layers)] = TiedLayerSpec(TIED_EMBEDDING_KEY, EmbeddingPipe, **embedding,
                                                       forward_fn=_lm_head, tied_weight_attr="word_embeddings.weight")
    return specs


def layer_class_names(num_layers: int) -> list[str]:
    """The class name at every pipeline index ("identity" for the weightless layers): what
    DeepSpeed's ``type:REGEX`` partitioning matches."""
    names = ["identity"] * (lm_head_index(num_layers) + 1)
    names[EMBEDDING_INDEX] = names[lm_head_index(num_layers)] = EmbeddingPipe.__name__
    for i in range(num_layers):
        names[block_index(i)] = TransformerLayerPipe.__name__
    names[final_layernorm_index(num_layers)] = FinalLayerNormPipe.__name__
    return names


def build_pipeline_model(cfg: Config, parallel, seed: int, rng_tracker=None, kernels: Optional[Kernels] = None):
    """DeepSpeed ``PipelineModule`` over our parallel state's topology (PP x DP x TP).

    With an ``rng_tracker`` its checkpoint function recomputes blocks: DeepSpeed's default one
    replays only DeepSpeed's own tracker, not ours, and dropout would draw new masks."""
    from deepspeed.pipe import PipelineModule

    t = cfg.training
    tp_group = parallel.tp_group_or_none
    head = (kernels or select_kernels(cfg.model, "cpu")).cross_entropy.fn
    pipe: Optional[PipelineModule] = None

    def loss_fn(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Called on the last stage only, which holds the tied embedding (its LM head layer).
        embedding = pipe.tied_modules[TIED_EMBEDDING_KEY].word_embeddings
        return lm_head_loss(hidden, embedding, labels, head)

    extra = {"activation_checkpoint_func": rng_tracker.checkpoint} if rng_tracker is not None else {}
    pipe = PipelineModule(
        layers=layer_specs(cfg, tp_group, seed, rng_tracker, kernels),
        loss_fn=loss_fn,
        topology=parallel.deepspeed_topology(),
        partition_method=cfg.parallel.pp_partition_method,
        activation_checkpoint_interval=t.checkpoint_num_layers if t.checkpoint_activations else 0,
        checkpointable_layers=[TransformerLayerPipe.__name__],
        **extra,
    )
    return pipe


def stage_partition(cfg: Config) -> list[tuple[int, int]]:
    """[start, end) pipeline layer indices per stage, as DeepSpeed will partition them."""
    import re

    from deepspeed.runtime import utils as ds_utils

    pp = cfg.parallel.pipeline_model_parallel_size
    names = layer_class_names(cfg.model.num_layers)
    method = cfg.parallel.pp_partition_method
    if method.lower().startswith("type:"):
        pattern = re.compile(method.split(":", 1)[1], re.IGNORECASE)
        weights = [1 if pattern.search(name) else 0 for name in names]
        bounds = ds_utils.partition_balanced(weights=weights, num_parts=pp)
    elif method == "uniform":
        bounds = ds_utils.partition_uniform(num_items=len(names), num_parts=pp)
    else:
        raise ValueError(f"parallel.pp_partition_method {method!r} is not supported: use 'type:REGEX' or 'uniform'")
    return [(bounds[i], bounds[i + 1]) for i in range(pp)]
