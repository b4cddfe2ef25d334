"""State dicts of transformers' BLOOM versus ours (the parameter names: megatron/model/layout.py).

Both name the block parameters identically and use the same fused-QKV row layout, so tensors
move across unchanged; transformers' ``lm_head.weight`` is tied to the word embeddings.
"""

from __future__ import annotations

from typing import Mapping

import torch

from megatron.model.layout import HF_PREFIX, HF_TIED_HEAD, hf_to_ours_name, ours_to_hf_name


def hf_to_ours_state_dict(hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers BLOOM state dict to ours; the tied ``lm_head`` must equal the embedding."""
    ours = {}
    for name, tensor in hf_state.items():
        if name == HF_TIED_HEAD:
            continue
        ours[hf_to_ours_name(name)] = tensor
    head = hf_state.get(HF_TIED_HEAD)
    embedding = ours.get("embedding.word_embeddings.weight")
    if head is not None and embedding is not None and not torch.equal(head, embedding):
        raise ValueError("lm_head.weight differs from word_embeddings.weight: BLOOM ties them; this checkpoint is not "
                         "a BLOOM")
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
    hf = {HF_PREFIX + ours_to_hf_name(n): t for n, t in state.items()}
    hf[HF_TIED_HEAD] = hf[HF_PREFIX + ours_to_hf_name("embedding.word_embeddings.weight")]
    return hf
