"""BLOOM's layer layout, written once: pipeline indices, the tensors of each layer, how tensor
parallelism splits them, and every naming of a parameter. The model builds itself from these
facts; checkpoints, converters and the memory estimate ask this module.

Megatron-DeepSpeed numbers BLOOM's pipeline layers as follows (the identity layers at 0, 2 and
L + 3 hold no weights; see megatron/model/pipeline.py), and DeepSpeed writes one layer file
per index that holds weights:

    index 1        embedding     word_embeddings.weight        [V/tp, h]   split on dim 0 (vocabulary)
                                 word_embeddings.norm.{weight,bias}        duplicated
    index i + 3    block i       input_layernorm.{weight,bias}             duplicated
                                 self_attention.query_key_value.weight     [3h/tp, h]  dim 0 (whole heads)
                                 self_attention.query_key_value.bias       [3h/tp]     dim 0
                                 self_attention.dense.weight               [h, h/tp]   dim 1 (row-parallel)
                                 self_attention.dense.bias                 duplicated
                                 post_attention_layernorm.{weight,bias}    duplicated
                                 mlp.dense_h_to_4h.{weight,bias}           [4h/tp, h]  dim 0
                                 mlp.dense_4h_to_h.weight                  [h, 4h/tp]  dim 1 (row-parallel)
                                 mlp.dense_4h_to_h.bias                    duplicated
    index L + 4    final LN      weight, bias                              duplicated
    index L + 5    LM head       the embedding again (tied), saved with index 1

One tensor has four names:

    layer file (index, key)   (1, word_embeddings.weight)        (i + 3, <key>)        (L + 4, weight)
    flat (BloomForCausalLM)   embedding.word_embeddings.weight   layers.i.<key>        final_layernorm.weight
    pipeline (PipelineModule) tied_modules.embed.word_...        {i + 3}.<key>         {L + 4}.weight
    transformers              transformer.word_embeddings.weight transformer.h.i.<key> transformer.ln_f.weight

transformers also names the embedding LayerNorm ``word_embeddings_layernorm`` and has an
``lm_head.weight`` tied to the embedding. The fused-QKV rows are [head, (q, k, v), head_dim] in
both, and TP splits them in contiguous chunks, so every rank keeps whole heads.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import torch

from megatron.config import ModelConfig
from megatron.errors import ConversionError

EMBEDDING_INDEX = 1
FIRST_BLOCK_INDEX = 3
TIED_EMBEDDING_KEY = "embed"  # DeepSpeed's TiedLayerSpec key of the embedding and the LM head
TIED_PREFIX = f"tied_modules.{TIED_EMBEDDING_KEY}."
VOCABULARY_KEY = "word_embeddings.weight"

EMBEDDING_KEYS = (VOCABULARY_KEY, "word_embeddings.norm.weight", "word_embeddings.norm.bias")
BLOCK_KEYS = (
    "input_layernorm.weight", "input_layernorm.bias",
    "self_attention.query_key_value.weight", "self_attention.query_key_value.bias",
    "self_attention.dense.weight", "self_attention.dense.bias",
    "post_attention_layernorm.weight", "post_attention_layernorm.bias",
    "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
    "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
)
FINAL_LAYERNORM_KEYS = ("weight", "bias")

# The split dimension of every TP-sharded key; keys not listed are duplicated on every TP rank.
# Column-parallel layers split their output rows (0), row-parallel ones their input columns (1).
PARTITION_DIMS = {
    VOCABULARY_KEY: 0,
    "self_attention.query_key_value.weight": 0,
    "self_attention.query_key_value.bias": 0,
    "self_attention.dense.weight": 1,
    "mlp.dense_h_to_4h.weight": 0,
    "mlp.dense_h_to_4h.bias": 0,
    "mlp.dense_4h_to_h.weight": 1,
}
_KNOWN_KEYS = frozenset(EMBEDDING_KEYS + BLOCK_KEYS + FINAL_LAYERNORM_KEYS)

# Flat-name prefix of each kind of layer (a block's also carries its number).
_FLAT_PREFIX = {"embedding": "embedding.", "block": "layers.", "final_layernorm": "final_layernorm."}
# Regex prefixes of both engines' names of each kind, for DeepSpeed's universal-checkpoint patterns.
_NAME_PATTERN_PREFIX = {"embedding": rf"(embedding\.|{re.escape(TIED_PREFIX)})", "block": r"(layers\.\d+\.|\d+\.)",
                        "final_layernorm": r"(final_layernorm\.|\d+\.)"}

HF_PREFIX = "transformer."
HF_TIED_HEAD = "lm_head.weight"
_HF_FIXED = {  # transformers (BloomModel level) -> flat
    "word_embeddings.weight": "embedding.word_embeddings.weight",
    "word_embeddings_layernorm.weight": "embedding.word_embeddings.norm.weight",
    "word_embeddings_layernorm.bias": "embedding.word_embeddings.norm.bias",
    "ln_f.weight": "final_layernorm.weight",
    "ln_f.bias": "final_layernorm.bias",
}
_HF_BLOCK = re.compile(r"^h\.(\d+)\.(.+)$")
_FLAT_BLOCK = re.compile(r"^layers\.(\d+)\.(.+)$")


# -- indices ----------------------------------------------------------------------------------

def block_index(layer_number: int) -> int:
    """Pipeline layer index of transformer block ``layer_number`` (0-based): layer_number + 3."""
    return FIRST_BLOCK_INDEX + layer_number


def final_layernorm_index(num_layers: int) -> int:
    """Pipeline layer index of the final LayerNorm: num_layers + 4."""
    return num_layers + 4


def lm_head_index(num_layers: int) -> int:
    """Pipeline layer index of the LM head (the tied embedding's second use): num_layers + 5."""
    return num_layers + 5


def layer_indices(num_layers: int) -> list[int]:
    """Every pipeline index that has a layer file, in model order: 1, 3 .. L+2, L+4."""
    return [EMBEDDING_INDEX, *(block_index(i) for i in range(num_layers)), final_layernorm_index(num_layers)]


def num_layers_of(indices: list[int]) -> int:
    """The number of blocks of a model whose layer files have these indices (the last is L + 4)."""
    return max(indices) - final_layernorm_index(0)


def layer_kind(index: int, num_layers: int) -> str:
    """``"embedding"``, ``"block"`` or ``"final_layernorm"`` for a pipeline layer index."""
    if index == EMBEDDING_INDEX:
        return "embedding"
    if FIRST_BLOCK_INDEX <= index < block_index(num_layers):
        return "block"
    if index == final_layernorm_index(num_layers):
        return "final_layernorm"
    raise ConversionError(f"pipeline layer index {index} holds no weights in a {num_layers}-layer BLOOM "
                          f"(weights live at 1, 3..{num_layers + 2} and {num_layers + 4})")


# -- tensors ----------------------------------------------------------------------------------

def layer_keys(index: int, num_layers: int, embed_layernorm: bool = True) -> tuple[str, ...]:
    """The tensor keys a layer file at ``index`` holds, in model order."""
    kind = layer_kind(index, num_layers)
    if kind == "embedding":
        return EMBEDDING_KEYS if embed_layernorm else EMBEDDING_KEYS[:1]
    return BLOCK_KEYS if kind == "block" else FINAL_LAYERNORM_KEYS


def partition_dim(key: str) -> Optional[int]:
    """Dimension along which ``key`` is split over TP ranks; None when it is duplicated."""
    if key not in _KNOWN_KEYS:
        raise ConversionError(f"'{key}' is not a tensor of a BLOOM layer file; known keys: {sorted(_KNOWN_KEYS)}")
    return PARTITION_DIMS.get(key)


def full_shapes(cfg: ModelConfig, padded_vocab_size: int, index: int) -> dict[str, tuple[int, ...]]:
    """Single-device (merged) shape of every tensor in the layer file at ``index``."""
    h, f = cfg.hidden_size, cfg.ffn_size
    kind = layer_kind(index, cfg.num_layers)
    if kind == "embedding":
        shapes = {VOCABULARY_KEY: (padded_vocab_size, h)}
        if cfg.embed_layernorm:
            shapes.update({"word_embeddings.norm.weight": (h,), "word_embeddings.norm.bias": (h,)})
        return shapes
    if kind == "final_layernorm":
        return {"weight": (h,), "bias": (h,)}
    return {
        "input_layernorm.weight": (h,), "input_layernorm.bias": (h,),
        "self_attention.query_key_value.weight": (3 * h, h), "self_attention.query_key_value.bias": (3 * h,),
        "self_attention.dense.weight": (h, h), "self_attention.dense.bias": (h,),
        "post_attention_layernorm.weight": (h,), "post_attention_layernorm.bias": (h,),
        "mlp.dense_h_to_4h.weight": (f, h), "mlp.dense_h_to_4h.bias": (f,),
        "mlp.dense_4h_to_h.weight": (h, f), "mlp.dense_4h_to_h.bias": (h,),
    }


def name_patterns(embed_layernorm: bool, split_on: Optional[int]) -> list[str]:
    """Regexes (for ``re.match``) of the parameters split on dimension ``split_on`` (None:
    duplicated over TP), matching both engines' names: DeepSpeed's universal-checkpoint patterns."""
    kinds = {"embedding": EMBEDDING_KEYS if embed_layernorm else EMBEDDING_KEYS[:1], "block": BLOCK_KEYS,
             "final_layernorm": FINAL_LAYERNORM_KEYS}
    return [rf"^{_NAME_PATTERN_PREFIX[kind]}{re.escape(key)}$"
            for kind, keys in kinds.items() for key in keys if PARTITION_DIMS.get(key) == split_on]


def vocabulary_pattern() -> str:
    """Regex of the vocabulary matrix in both engines' names (padded rows may be appended)."""
    return rf"^{_NAME_PATTERN_PREFIX['embedding']}{re.escape(VOCABULARY_KEY)}$"


def pipeline_replicated_pattern() -> str:
    """Regex of the parameters PipelineModule keeps on more than one stage: the tied embedding."""
    return f"^{re.escape(TIED_PREFIX)}"


# -- names --------------------------------------------------------------------------------------

def module_key_to_layer(name: str, num_layers: Optional[int]) -> tuple[int, str]:
    """(pipeline layer index, key inside the layer file) of a flat or pipeline parameter name;
    ``num_layers`` is needed only for ``final_layernorm.*``."""
    if name.startswith(TIED_PREFIX):
        return EMBEDDING_INDEX, name[len(TIED_PREFIX):]
    head, _, rest = name.partition(".")
    if head.isdigit():
        return int(head), rest
    if head == "embedding":
        return EMBEDDING_INDEX, rest
    if head == "layers":
        number, _, key = rest.partition(".")
        return block_index(int(number)), key
    if head == "final_layernorm":
        if num_layers is None:
            raise ConversionError("num_layers is needed to place final_layernorm.* in a layer file")
        return final_layernorm_index(num_layers), rest
    raise ConversionError(f"parameter '{name}' belongs to no BLOOM pipeline layer: add its module to "
                          "megatron/model/layout.py when adding it to BloomForCausalLM")


def layer_to_flat_name(index: int, key: str, num_layers: int) -> str:
    """The flat (``BloomForCausalLM``) name of tensor ``key`` of the layer file at ``index``."""
    kind = layer_kind(index, num_layers)
    number = f"{index - FIRST_BLOCK_INDEX}." if kind == "block" else ""
    return f"{_FLAT_PREFIX[kind]}{number}{key}"


def flat_name(name: str, num_layers: int) -> str:
    """The flat name of a parameter named either way (``3.mlp...`` -> ``layers.0.mlp...``)."""
    return layer_to_flat_name(*module_key_to_layer(name, num_layers), num_layers)


def pipeline_name(name: str, num_layers: int) -> str:
    """The ``PipelineModule`` name of a parameter named either way (inverse of :func:`flat_name`)."""
    index, key = module_key_to_layer(name, num_layers)
    layer_kind(index, num_layers)  # refuses indices that hold no weights
    return f"{TIED_PREFIX}{key}" if index == EMBEDDING_INDEX else f"{index}.{key}"


def is_pipeline_name(name: str) -> bool:
    """Whether ``name`` is in the pipeline's naming (``tied_modules.*`` or ``<index>.*``)."""
    return name.startswith("tied_modules.") or name.split(".", 1)[0].isdigit()


def split_into_layers(state_dict: Mapping[str, torch.Tensor], num_layers: int) -> dict[int, dict[str, torch.Tensor]]:
    """A flat or pipeline state dict cut into pipeline layers, keys relative to each layer: exactly
    the keys the layer files hold."""
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        index, key = module_key_to_layer(name, num_layers)
        layers.setdefault(index, {})[key] = tensor
    return dict(sorted(layers.items()))


def hf_to_ours_name(name: str) -> str:
    """Our flat name for a transformers BLOOM parameter name (with or without ``transformer.``)."""
    name = name.removeprefix(HF_PREFIX)
    if name in _HF_FIXED:
        return _HF_FIXED[name]
    match = _HF_BLOCK.match(name)
    if match:
        return f"layers.{match.group(1)}.{match.group(2)}"
    raise KeyError(f"'{name}' is not a BLOOM parameter name known to this converter")


def ours_to_hf_name(name: str) -> str:
    """transformers' name (``BloomModel`` level, without ``transformer.``) for a flat name of ours."""
    for hf, ours in _HF_FIXED.items():
        if ours == name:
            return hf
    match = _FLAT_BLOCK.match(name)
    if match:
        return f"h.{match.group(1)}.{match.group(2)}"
    raise KeyError(f"'{name}' is not a parameter of our BLOOM model")


def layer_key_to_hf_name(index: int, key: str, num_layers: int) -> str:
    """transformers' ``BloomForCausalLM`` name (``transformer.``-prefixed) of tensor ``key`` in the
    layer file at pipeline index ``index``."""
    return HF_PREFIX + ours_to_hf_name(layer_to_flat_name(index, key, num_layers))


def hf_name_to_layer_key(name: str, num_layers: int) -> tuple[int, str]:
    """(pipeline index, key inside the layer file) of a transformers BLOOM parameter name."""
    return module_key_to_layer(hf_to_ours_name(name), num_layers)


def is_tied_head(name: str) -> bool:
    """Whether ``name`` is transformers' LM head, which BLOOM ties to the word embeddings."""
    return name == HF_TIED_HEAD
