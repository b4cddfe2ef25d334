"""Names of things in a checkpoint directory, in Megatron-DeepSpeed's layout.

    {save}/latest                                      tag of the newest complete checkpoint
    {save}/latest_checkpointed_iteration.txt           its iteration (Megatron's file)
    {save}/global_step{N}/
        layer_{XX}-model_{TT}-model_states.pt          one pipeline layer, one TP rank
        mp_rank_{MM}_model_states.pt                   DeepSpeed engine state + our client state
        [bf16_]zero_pp_rank_{D}_mp_rank_{MM}_optim_states.pt   ZeRO optimizer shards
        manifest.json                                  files and sizes, written last (ours)
    {save}/global_step{N}_universal/                   the same step, converted to DeepSpeed's
                                                       universal format for another layout

Layer indices are BLOOM's pipeline indices (megatron/model/pipeline.py): embedding 1, block i
at i + 3, final LayerNorm at L + 4. With a pipeline, DeepSpeed's ``PipelineModule`` writes the
layer files itself; without one, :func:`split_into_layers` cuts the single-module state dict
into the same files, so every checkpoint has the same model files whatever the layout.

Parameter names differ between the two engines (``layers.0.mlp...`` in the single module,
``3.mlp...`` in the pipeline, ``tied_modules.embed...`` for the tied embedding);
:func:`pipeline_name` and :func:`flat_name` translate between them.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from megatron.model.bloom import EMBEDDING_LAYER_INDEX, FIRST_BLOCK_LAYER_INDEX
from megatron.model.pipeline import TIED_EMBEDDING_KEY, final_layernorm_index, pipeline_to_model_name

TAG_PREFIX = "global_step"
TAG_PATTERN = re.compile(rf"^{TAG_PREFIX}(\d+)$")
UNIVERSAL_SUFFIX = "_universal"
LATEST_FILE = "latest"
LATEST_ITERATION_FILE = "latest_checkpointed_iteration.txt"  # Megatron's name
MANIFEST_FILE = "manifest.json"


def checkpoint_tag(iteration: int) -> str:
    """Megatron-DeepSpeed's directory name for the checkpoint after ``iteration`` steps."""
    return f"{TAG_PREFIX}{iteration}"


def iteration_of(tag: str) -> Optional[int]:
    """The iteration in a ``global_stepN`` name, or None for any other name."""
    match = TAG_PATTERN.match(tag)
    return int(match.group(1)) if match else None


def universal_tag(tag: str) -> str:
    """Directory name of the universal conversion of checkpoint ``tag``."""
    return f"{tag}{UNIVERSAL_SUFFIX}"


def layer_file_name(layer_index: int, tp_rank: int) -> str:
    """``layer_XX-model_YY-model_states.pt``, as DeepSpeed's PipelineModule names it."""
    return f"layer_{layer_index:02d}-model_{tp_rank:02d}-model_states.pt"


def split_into_layers(state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[int, dict[str, torch.Tensor]]:
    """Cut the single-module state dict into pipeline layers, keys relative to each layer.

    ``embedding.word_embeddings.weight`` becomes ``word_embeddings.weight`` of layer 1,
    ``layers.i.input_layernorm.weight`` becomes ``input_layernorm.weight`` of layer i + 3 and
    ``final_layernorm.weight`` becomes ``weight`` of layer L + 4: exactly the keys the
    pipeline's own layer files hold.
    """
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        index, key = _layer_of(name, num_layers)
        layers.setdefault(index, {})[key] = tensor
    return dict(sorted(layers.items()))


def _layer_of(name: str, num_layers: int) -> tuple[int, str]:
    if name.startswith("embedding."):
        return EMBEDDING_LAYER_INDEX, name[len("embedding."):]
    if name.startswith("final_layernorm."):
        return final_layernorm_index(num_layers), name[len("final_layernorm."):]
    if name.startswith("layers."):
        block, key = name[len("layers."):].split(".", 1)
        return FIRST_BLOCK_LAYER_INDEX + int(block), key
    raise KeyError(f"model parameter {name!r} belongs to no pipeline layer: update megatron/checkpoint/layout.py "
                   "when adding modules to BloomForCausalLM")


def flat_name(pipeline_parameter: str, num_layers: int) -> str:
    """Single-module name of a ``PipelineModule`` parameter (``3.mlp...`` -> ``layers.0.mlp...``)."""
    name = pipeline_to_model_name(pipeline_parameter, num_layers)
    if name is None:
        raise KeyError(f"pipeline parameter {pipeline_parameter!r} has no single-module name")
    return name


def pipeline_name(flat_parameter: str, num_layers: int) -> str:
    """``PipelineModule`` name of a single-module parameter (inverse of :func:`flat_name`)."""
    index, key = _layer_of(flat_parameter, num_layers)
    if index == EMBEDDING_LAYER_INDEX:
        return f"tied_modules.{TIED_EMBEDDING_KEY}.{key}"
    return f"{index}.{key}"


def is_pipeline_name(name: str) -> bool:
    """Whether ``name`` is in the pipeline's naming (``tied_modules.*`` or ``<index>.*``)."""
    return name.startswith("tied_modules.") or name.split(".", 1)[0].isdigit()
