"""The non-weight files of a transformers BLOOM folder: config.json, generation_config.json and
the tokenizer files; and our model shape read back from a config.json.

``config.json`` follows ``transformers.BloomConfig`` (``n_layer``, ``n_head``, ``hidden_size``,
``vocab_size`` = the padded vocabulary, ``architectures: ["BloomForCausalLM"]``...). Older BLOOM
folders spell some fields differently (``n_embed``, ``num_hidden_layers``); the reader accepts
those. The tokenizer is the ``tokenizer.json`` itself plus a ``tokenizer_config.json`` naming
``BloomTokenizerFast``, which transformers 4 loads as that class and transformers 5 as its
``tokenizers``-backed tokenizer, both offline.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from megatron.config import ModelConfig
from megatron.errors import ConversionError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """torch dtype for ``fp32``/``bf16``/``fp16`` (or their long names); None for ``auto``/None."""
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise ConversionError(f"unknown dtype {name!r}: use auto, fp32, bf16 or fp16")
    return DTYPES[name]


@dataclass(frozen=True)
class SpecialTokens:
    """Special tokens of the tokenizer, as strings and ids (None when the vocabulary lacks one)."""

    bos: Optional[str]
    bos_id: Optional[int]
    eos: Optional[str]
    eos_id: Optional[int]
    pad: Optional[str]
    pad_id: Optional[int]
    unk: Optional[str]
    unk_id: Optional[int]


# BLOOM's own tokenizer: <unk> 0, <s> 1, </s> 2, <pad> 3 (used when no tokenizer is given).
BLOOM_TOKENS = SpecialTokens("<s>", 1, "</s>", 2, "<pad>", 3, "<unk>", 0)


def special_tokens_of(tokenizer) -> SpecialTokens:
    """Special tokens of a ``megatron.data.tokenizer.HFTokenizer``: EOS is its end-of-document
    token, BOS ``<s>`` when present (else EOS), PAD its pad token, UNK ``<unk>`` when present."""
    bos_id = tokenizer.token_to_id("<s>")
    unk_id = tokenizer.token_to_id("<unk>")
    return SpecialTokens(
        bos="<s>" if bos_id is not None else tokenizer.eod_token,
        bos_id=bos_id if bos_id is not None else tokenizer.eod_id,
        eos=tokenizer.eod_token, eos_id=tokenizer.eod_id,
        pad=tokenizer.pad_token, pad_id=tokenizer.pad_id,
        unk="<unk>" if unk_id is not None else None, unk_id=unk_id,
    )


def hf_config_dict(cfg: ModelConfig, padded_vocab_size: int, dtype: torch.dtype, tokens: SpecialTokens) -> dict:
    """The ``config.json`` of a ``BloomForCausalLM`` with our model's shape."""
    if cfg.ffn_size != 4 * cfg.hidden_size:
        raise ConversionError(f"model.ffn_hidden_size={cfg.ffn_hidden_size} is not 4 x hidden_size: transformers' "
                              "BLOOM always uses 4 x hidden_size, so this model cannot be exported")
    if not cfg.embed_layernorm:
        raise ConversionError("model.embed_layernorm is false: transformers' BLOOM always has the embedding "
                              "LayerNorm, so this model cannot be exported")
    return {
        "apply_residual_connection_post_layernorm": False,
        "architectures": ["BloomForCausalLM"],
        "attention_dropout": cfg.attention_dropout,
        "bos_token_id": tokens.bos_id,
        "eos_token_id": tokens.eos_id,
        "pad_token_id": tokens.pad_id,
        "unk_token_id": tokens.unk_id,
        "hidden_dropout": cfg.hidden_dropout,
        "hidden_size": cfg.hidden_size,
        "initializer_range": cfg.init_method_std,
        "layer_norm_epsilon": cfg.layernorm_epsilon,
        "model_type": "bloom",
        "n_head": cfg.num_attention_heads,
        "n_layer": cfg.num_layers,
        "pretraining_tp": 1,
        "slow_but_exact": False,
        "tie_word_embeddings": True,
        "dtype": DTYPE_NAMES[dtype],  # transformers 5 reads "dtype", older versions "torch_dtype"
        "torch_dtype": DTYPE_NAMES[dtype],
        "use_cache": True,
        "vocab_size": padded_vocab_size,
    }


def generation_config_dict(tokens: SpecialTokens) -> dict:
    """``generation_config.json``: the special token ids generation stops and pads with."""
    return {"bos_token_id": tokens.bos_id, "eos_token_id": tokens.eos_id, "pad_token_id": tokens.pad_id}


def write_json(path: Path, values: dict) -> None:
    """Write ``values`` as indented JSON with a trailing newline."""
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_tokenizer_files(tokenizer_file: str | os.PathLike, out_dir: Path, tokens: SpecialTokens,
                          model_max_length: int) -> list[str]:
    """Copy ``tokenizer.json`` (decompressing a ``.gz``) and write ``tokenizer_config.json`` and
    ``special_tokens_map.json`` next to it; returns the file names."""
    source = Path(tokenizer_file)
    if source.is_dir():
        source = next((source / n for n in ("tokenizer.json", "tokenizer.json.gz") if (source / n).is_file()),
                      source / "tokenizer.json")
    raw = gzip.decompress(source.read_bytes()) if source.suffix == ".gz" else source.read_bytes()
    (out_dir / "tokenizer.json").write_bytes(raw)
    special = {name: value for name, value in (("bos_token", tokens.bos), ("eos_token", tokens.eos),
                                               ("pad_token", tokens.pad), ("unk_token", tokens.unk)) if value}
    write_json(out_dir / "special_tokens_map.json", special)
    write_json(out_dir / "tokenizer_config.json", {
        **special,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "tokenizer_class": "BloomTokenizerFast",
    })
    return ["tokenizer.json", "special_tokens_map.json", "tokenizer_config.json"]


def read_hf_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a transformers folder; fails unless it describes a BLOOM."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{folder} has no config.json: point --hf at a transformers model folder")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from None
    model_type = values.get("model_type")
    if model_type != "bloom":
        raise ConversionError(f"{path} has model_type={model_type!r}, not 'bloom': this converter only handles "
                              "BLOOM models (BloomForCausalLM)")
    return values


def _first(values: dict[str, Any], names: tuple[str, ...], path: str) -> Any:
    for name in names:
        if values.get(name) is not None:
            return values[name]
    raise ConversionError(f"{path} lacks {names[0]} (also looked for {', '.join(names[1:]) or 'no alias'})")


def model_shape_from_hf(values: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """Our ``model`` config fields for a BLOOM ``config.json`` (padded vocabulary in
    ``pad_vocab_size_to``)."""
    if values.get("apply_residual_connection_post_layernorm"):
        raise ConversionError(f"{where}: apply_residual_connection_post_layernorm is true; BLOOM (and this "
                              "framework) takes residuals before the LayerNorm")
    hidden = int(_first(values, ("hidden_size", "n_embed"), where))
    heads = int(_first(values, ("n_head", "num_attention_heads"), where))
    layers = int(_first(values, ("n_layer", "num_hidden_layers"), where))
    vocab = int(_first(values, ("vocab_size",), where))
    if hidden % heads:
        raise ConversionError(f"{where}: hidden_size {hidden} is not divisible by n_head {heads}")
    return {
        "num_layers": layers, "hidden_size": hidden, "num_attention_heads": heads, "vocab_size": vocab,
        "pad_vocab_size_to": vocab, "layernorm_epsilon": float(values.get("layer_norm_epsilon", 1e-5)),
        "hidden_dropout": float(values.get("hidden_dropout", 0.0) or 0.0),
        "attention_dropout": float(values.get("attention_dropout", 0.0) or 0.0),
        "embed_layernorm": True,
        **({"init_method_std": float(values["initializer_range"])} if values.get("initializer_range") else {}),
    }
