"""Parameter names of transformers' BLOOM versus ours (Megatron-DeepSpeed's).

transformers                                   ours (single-device model)
transformer.word_embeddings.weight             embedding.word_embeddings.weight
transformer.word_embeddings_layernorm.{w,b}    embedding.word_embeddings.norm.{w,b}
transformer.h.{i}.<rest>                       layers.{i}.<rest>   (same block names)
transformer.ln_f.{w,b}                         final_layernorm.{w,b}
lm_head.weight                                 tied to embedding.word_embeddings.weight

Both name the block parameters identically and use the same fused-QKV row layout, so tensors
move across unchanged.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

_FIXED = {
    "word_embeddings.weight": "embedding.word_embeddings.weight",
    "word_embeddings_layernorm.weight": "embedding.word_embeddings.norm.weight",
    "word_embeddings_layernorm.bias": "embedding.word_embeddings.norm.bias",
    "ln_f.weight": "final_layernorm.weight",
    "ln_f.bias": "final_layernorm.bias",
}
_BLOCK = re.compile(r"^h\.(\d+)\.(.+)$")
_OURS_BLOCK = re.compile(r"^layers\.(\d+)\.(.+)$")
_TIED_HEAD = "lm_head.weight"


def hf_to_ours_name(name: str) -> str:
    """Our name for a transformers BLOOM parameter name (with or without ``transformer.``)."""
    name = name.removeprefix("transformer.")
    if name in _FIXED:
        return _FIXED[name]
    match = _BLOCK.match(name)
    if match:
        return f"layers.{match.group(1)}.{match.group(2)}"
    raise KeyError(f"'{name}' is not a BLOOM parameter name known to this converter")


def ours_to_hf_name(name: str) -> str:
    """transformers' name (``BloomModel`` level, without ``transformer.``) for one of ours."""
    for hf, ours in _FIXED.items():
        if ours == name:
            return hf
    match = _OURS_BLOCK.match(name)
    if match:
        return f"h.{match.group(1)}.{match.group(2)}"
    raise KeyError(f"'{name}' is not a parameter of our BLOOM model")


def hf_to_ours_state_dict(hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers BLOOM state dict to ours; the tied ``lm_head`` must equal the embedding."""
    ours = {}
    for name, tensor in hf_state.items():
        if name == _TIED_HEAD:
            continue
        ours[hf_to_ours_name(name)] = tensor
    head = hf_state.get(_TIED_HEAD)
    embedding = ours.get("embedding.word_embeddings.weight")
    if head is not None and embedding is not None and not torch.equal(head, embedding):
        raise ValueError("lm_head.weight differs from word_embeddings.weight: BLOOM ties them; this checkpoint is not a BLOOM")
    return ours


def load_hf_state_dict(model: torch.nn.Module, hf_state: Mapping[str, torch.Tensor]) -> None:
    """Copy a transformers BLOOM state dict into our single-device model, strictly (shapes and names)."""
    ours = hf_to_ours_state_dict(hf_state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(set(ours) - set(expected))
    if missing or unexpected:
        raise KeyError(f"state dict does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in ours.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(expected[name].shape)}; "
                "check hidden_size, num_layers and the padded vocabulary in the config"
            )
    model.load_state_dict(ours, strict=True)


def ours_to_hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our single-device state dict under transformers' ``BloomForCausalLM`` names (head tied)."""
    hf = {f"transformer.{ours_to_hf_name(n)}": t for n, t in state.items()}
    hf[_TIED_HEAD] = hf["transformer.word_embeddings.weight"]
    return hf


# ---------------------------------------------------------------------------------------------
# Layer files (pipeline index, key inside the file) <-> transformers names

HF_PREFIX = "transformer."


def layer_key_to_hf_name(index: int, key: str, num_layers: int) -> str:
    """transformers' ``BloomForCausalLM`` name (``transformer.``-prefixed) of tensor ``key`` in the
    layer file at pipeline index ``index`` (see megatron/convert/layout.py)."""
    from megatron.convert.layout import layer_kind

    kind = layer_kind(index, num_layers)
    ours = {"embedding": f"embedding.{key}", "block": f"layers.{index - 3}.{key}",
            "final_layernorm": f"final_layernorm.{key}"}[kind]
    return HF_PREFIX + ours_to_hf_name(ours)


def hf_name_to_layer_key(name: str, num_layers: int) -> tuple[int, str]:
    """(pipeline index, key inside the layer file) of a transformers BLOOM parameter name."""
    from megatron.convert.layer_files import module_key_to_layer

    return module_key_to_layer(hf_to_ours_name(name), num_layers)


def is_tied_head(name: str) -> bool:
    """Whether ``name`` is transformers' LM head, which BLOOM ties to the word embeddings."""
    return name == _TIED_HEAD
