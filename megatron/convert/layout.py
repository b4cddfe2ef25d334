"""What a BLOOM checkpoint's layer files hold: layer indices, tensor keys, full shapes, TP rules.

Megatron-DeepSpeed numbers BLOOM's pipeline layers as follows, and names one file per layer
index XX and tensor-parallel rank YY ``layer_XX-model_YY-model_states.pt``:

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

Merging TP shards concatenates split tensors along their dimension and takes rank 0's copy of
duplicated ones (they are equal in a healthy run; Megatron's tools average them, which gives
the same tensor then). Splitting is the reverse: contiguous chunks, so each rank keeps whole
attention heads because the fused QKV rows are laid out [head, (q, k, v), head_dim].
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron.config import ModelConfig
from megatron.convert.errors import ConversionError

EMBEDDING_INDEX = 1
FIRST_BLOCK_INDEX = 3

EMBEDDING_KEYS = ("word_embeddings.weight", "word_embeddings.norm.weight", "word_embeddings.norm.bias")
BLOCK_KEYS = (
    "input_layernorm.weight", "input_layernorm.bias",
    "self_attention.query_key_value.weight", "self_attention.query_key_value.bias",
    "self_attention.dense.weight", "self_attention.dense.bias",
    "post_attention_layernorm.weight", "post_attention_layernorm.bias",
    "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
    "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
)
FINAL_LAYERNORM_KEYS = ("weight", "bias")

# Split dimension of every TP-sharded key; keys not listed are duplicated on every TP rank.
_PARTITION_DIMS = {
    "word_embeddings.weight": 0,
    "self_attention.query_key_value.weight": 0,
    "self_attention.query_key_value.bias": 0,
    "self_attention.dense.weight": 1,
    "mlp.dense_h_to_4h.weight": 0,
    "mlp.dense_h_to_4h.bias": 0,
    "mlp.dense_4h_to_h.weight": 1,
}
_KNOWN_KEYS = frozenset(EMBEDDING_KEYS + BLOCK_KEYS + FINAL_LAYERNORM_KEYS)


def block_index(layer_number: int) -> int:
    """Pipeline layer index of transformer block ``layer_number`` (0-based): layer_number + 3."""
    return FIRST_BLOCK_INDEX + layer_number


def final_layernorm_index(num_layers: int) -> int:
    """Pipeline layer index of the final LayerNorm: num_layers + 4."""
    return num_layers + 4


def layer_indices(num_layers: int) -> list[int]:
    """Every pipeline index that has a layer file, in model order: 1, 3 .. L+2, L+4."""
    return [EMBEDDING_INDEX, *(block_index(i) for i in range(num_layers)), final_layernorm_index(num_layers)]


def layer_kind(index: int, num_layers: int) -> str:
    """``"embedding"``, ``"block"`` or ``"final_layernorm"`` for a pipeline layer index."""
    if index == EMBEDDING_INDEX:
        return "embedding"
    if FIRST_BLOCK_INDEX <= index < FIRST_BLOCK_INDEX + num_layers:
        return "block"
    if index == final_layernorm_index(num_layers):
        return "final_layernorm"
    raise ConversionError(f"pipeline layer index {index} holds no weights in a {num_layers}-layer BLOOM "
                          f"(weights live at 1, 3..{num_layers + 2} and {num_layers + 4})")


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
    return _PARTITION_DIMS.get(key)


def full_shapes(cfg: ModelConfig, padded_vocab_size: int, index: int) -> dict[str, tuple[int, ...]]:
    """Single-device (merged) shape of every tensor in the layer file at ``index``."""
    h, f = cfg.hidden_size, cfg.ffn_size
    kind = layer_kind(index, cfg.num_layers)
    if kind == "embedding":
        shapes = {"word_embeddings.weight": (padded_vocab_size, h)}
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


def merge_shards(key: str, shards: Sequence[torch.Tensor], where: str = "") -> tuple[torch.Tensor, float]:
    """One TP-merged tensor from every rank's shard (rank order) and, for duplicated tensors,
    the largest absolute difference of any rank's copy from rank 0's (0.0 otherwise).

    ``where`` (e.g. the layer file names) goes into error messages.
    """
    dim = partition_dim(key)
    if len(shards) == 1:
        return shards[0], 0.0
    if dim is not None:
        shapes = {tuple(s.shape) for s in shards}
        rest = {shape[:dim] + shape[dim + 1:] for shape in shapes}
        if len(rest) != 1:
            raise ConversionError(f"{key}{where}: TP shards have shapes {sorted(shapes)} that cannot be "
                                  f"concatenated along dim {dim}; the files come from different checkpoints")
        return torch.cat(list(shards), dim=dim), 0.0
    first = shards[0]
    drift = 0.0
    for other in shards[1:]:
        if other.shape != first.shape:
            raise ConversionError(f"{key}{where}: duplicated tensor has shape {tuple(other.shape)} on one TP rank "
                                  f"and {tuple(first.shape)} on rank 0; the files come from different checkpoints")
        if not torch.equal(other, first):
            drift = max(drift, (other.float() - first.float()).abs().max().item())
    return first, drift


def split_full(key: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """TP rank ``tp_rank``'s part of the merged tensor ``full``: a tensor with storage of its own
    when split (safe to ``torch.save``), ``full`` itself when duplicated or ``tp_size`` is 1."""
    dim = partition_dim(key)
    if dim is None or tp_size == 1:
        return full
    if full.shape[dim] % tp_size:
        raise ConversionError(f"{key}: dimension {dim} of shape {tuple(full.shape)} does not split into {tp_size} "
                              "equal tensor-parallel shards; pick a TP size that divides it")
    return full.chunk(tp_size, dim)[tp_rank].clone(memory_format=torch.contiguous_format)


def sharded_shape(key: str, full_shape: Sequence[int], tp_size: int) -> tuple[int, ...]:
    """Shape of one TP rank's shard of a tensor whose merged shape is ``full_shape``."""
    dim = partition_dim(key)
    shape = list(full_shape)
    if dim is not None:
        shape[dim] //= tp_size
    return tuple(shape)
