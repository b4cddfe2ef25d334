"""Export one of our checkpoints (any TP x PP, any ZeRO stage, or bare layer files) to a
transformers BLOOM folder, one layer at a time.

    summary = export_to_hf("checkpoints/run", "exports/run-hf", dtype="bf16", tokenizer="tokenizer.json")

Only the layer files are read (``megatron.checkpoint.layer_files``): for every pipeline layer the
TP shards are loaded (memory-mapped), merged, cast and appended to the current safetensors
shard, then freed, so the memory needed is about one layer, whatever the model's size.
Everything is written into ``OUTPUT.tmp`` and renamed to ``OUTPUT`` at the end; a failed or
interrupted export leaves no folder that looks finished.

The model's shape comes from ``config`` (our YAML), else a ``config.yaml`` in the checkpoint
directory or next to it, else the ``config`` in the checkpoint's ``manifest.json`` (written by our
trainer), else the config in DeepSpeed's client state in ``mp_rank_00_model_states.pt`` (when
that file loads with ``weights_only=True``).
The shapes of the tensors decide everything they can (layers, hidden size, padded vocabulary)
and must agree with that config; only the number of attention heads, the LayerNorm epsilon and
the unpadded vocabulary come from the config alone.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from megatron.checkpoint.layer_files import LayerFileSet, load_tensor_file, read_layer_shards, resolve_checkpoint_dir
from megatron.checkpoint.layout import MANIFEST_FILE, engine_state_file_name
from megatron.checkpoint.resharding import merge_shards
from megatron.config import Config, ConfigError, config_from_dict, load_config
from megatron.convert.hf_files import (
    BLOOM_TOKENS,
    DTYPE_NAMES,
    generation_config_dict,
    hf_config_dict,
    parse_dtype,
    special_tokens_of,
    write_json,
    write_tokenizer_files,
)
from megatron.convert.output import prepare_output, publish
from megatron.convert.safetensors_stream import ShardedSafetensorsWriter, TensorPlan, parse_size
from megatron.errors import ConversionError
from megatron.model.layout import EMBEDDING_INDEX, full_shapes, layer_key_to_hf_name, partition_dim


@dataclass
class ExportSummary:
    """What an export wrote."""

    output: Path
    checkpoint_dir: Path
    config_source: str
    tp_size: int
    num_layers: int
    dtype: torch.dtype
    num_parameters: int
    total_bytes: int
    files: list[str]
    seconds: float
    drift: dict[str, float] = field(default_factory=dict)  # TP-duplicated tensors that differed
    tokenizer: Optional[str] = None


def _config_from_checkpoint(directory: Path) -> tuple[Optional[Config], str]:
    """A Config found with the checkpoint: config.yaml here or one level up, the ``config`` of the
    checkpoint's manifest.json, or the one in DeepSpeed's client state."""
    for candidate in (directory / "config.yaml", directory.parent / "config.yaml"):
        if candidate.is_file():
            return load_config(candidate), str(candidate)
    manifest = directory / MANIFEST_FILE
    if manifest.is_file():
        try:
            values = json.loads(manifest.read_text(encoding="utf-8")).get("config")
        except (OSError, json.JSONDecodeError, AttributeError):
            values = None
        if isinstance(values, dict):
            return config_from_dict(values, str(manifest)), f"{manifest} ('config')"
    client = directory / engine_state_file_name(0)
    if client.is_file():
        try:
            state = torch.load(client, map_location="cpu", weights_only=True, mmap=True)
            values = state.get("config") if isinstance(state, dict) else None
            if isinstance(values, dict):
                return config_from_dict(values, str(client)), f"{client} (client state 'config')"
        except Exception as exc:  # noqa: BLE001 - an optional source, but say why it was not used
            warnings.warn(f"could not read the run config from {client} ({type(exc).__name__}: {exc}); "
                          "pass --config to name it", stacklevel=2)
    return None, ""


def resolve_config(config: Optional[str | os.PathLike], directory: Path) -> tuple[Config, str]:
    """The run's Config: ``config`` when given, else one found with the checkpoint."""
    if config is not None:
        return load_config(config), str(config)
    found, source = _config_from_checkpoint(directory)
    if found is None:
        raise ConversionError(f"no config found for {directory} (looked for config.yaml there and one level up, "
                              "manifest.json and mp_rank_00_model_states.pt): pass --config with the run's YAML (e.g. "
                              "configs/bloom-560m.yaml); the number of attention heads cannot be read from weights")
    return found, source


def _check_against_files(cfg: Config, files: LayerFileSet, source: str) -> int:
    """Compare the config with the embedding file's shape; returns the padded vocabulary size."""
    embedding = load_tensor_file(files.path(EMBEDDING_INDEX, 0))
    if "word_embeddings.weight" not in embedding:
        raise ConversionError(f"{files.path(EMBEDDING_INDEX, 0)} has no word_embeddings.weight (keys: "
                              f"{sorted(embedding)}): not a BLOOM embedding layer file")
    rows, hidden = embedding["word_embeddings.weight"].shape
    padded = rows * files.tp_size
    m = cfg.model
    expected = (m.padded_vocab_size(files.tp_size), m.hidden_size)
    if (padded, hidden) != expected:
        raise ConversionError(
            f"word_embeddings.weight merged over {files.tp_size} TP rank(s) has shape {(padded, hidden)} but "
            f"{source} implies {expected}: check model.hidden_size, model.vocab_size and model.pad_vocab_size_to "
            "(the padded vocabulary) in the config")
    if m.num_layers != files.num_layers:
        raise ConversionError(f"{files.directory} holds {files.num_layers} transformer layers but {source} has "
                              f"model.num_layers={m.num_layers}: pass the run's own config")
    return padded


def _plan(cfg: Config, padded: int, dtype: torch.dtype, indices: list[int]) -> list[TensorPlan]:
    return [TensorPlan(layer_key_to_hf_name(index, key, cfg.model.num_layers), shape, dtype)
            for index in indices for key, shape in full_shapes(cfg.model, padded, index).items()]


def _tokenizer_path(tokenizer: Optional[str | os.PathLike], cfg: Config) -> Optional[Path]:
    if tokenizer is not None:
        path = Path(tokenizer)
        if not path.exists():
            raise ConversionError(f"tokenizer {path} does not exist")
        return path
    if cfg.data.tokenizer and Path(cfg.data.tokenizer).exists():
        return Path(cfg.data.tokenizer)
    return None


def export_to_hf(checkpoint: str | os.PathLike, output: str | os.PathLike, *, step: Optional[int] = None,
                 dtype: Optional[str] = None, max_shard_size: str | int = "5GB",
                 tokenizer: Optional[str | os.PathLike] = None, config: Optional[str | os.PathLike] = None,
                 overwrite: bool = False, progress: bool = True) -> ExportSummary:
    """Write a transformers ``BloomForCausalLM`` folder for the checkpoint at ``checkpoint``.

    Args:
        checkpoint: a save root (``latest`` or ``step`` picks the tag) or a ``global_stepN`` folder.
        output: the folder to create (config.json, safetensors, tokenizer, generation config).
        step: which ``global_step{step}`` to export.
        dtype: ``fp32``, ``bf16``, ``fp16``, or None/``auto`` for the dtype stored in the checkpoint.
        max_shard_size: largest safetensors file, e.g. ``"5GB"``; more weights are sharded with
            a ``model.safetensors.index.json``.
        tokenizer: ``tokenizer.json`` to ship with the model (default: the config's
            ``data.tokenizer`` when that file exists; otherwise no tokenizer files are written
            and BLOOM's special token ids are assumed).
        config: our YAML config of the run (see the module docstring for the fallbacks).
        overwrite: replace an existing ``output`` (only after the new export is complete).
        progress: show a tqdm bar over layers.
    """
    start = time.perf_counter()
    output = Path(output)
    directory = resolve_checkpoint_dir(checkpoint, step)
    files = LayerFileSet.discover(directory)
    try:
        cfg, source = resolve_config(config, directory)
    except ConfigError as err:
        raise ConversionError(str(err)) from None
    padded = _check_against_files(cfg, files, source)
    stored = load_tensor_file(files.path(EMBEDDING_INDEX, 0))["word_embeddings.weight"].dtype
    target = parse_dtype(dtype) or stored
    if target not in DTYPE_NAMES:
        raise ConversionError(f"the checkpoint stores {stored}; pass --dtype fp32, bf16 or fp16")
    tokenizer_path = _tokenizer_path(tokenizer, cfg)
    tokens = BLOOM_TOKENS
    if tokenizer_path is not None:
        from megatron.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_path)
        if tok.vocab_size > padded:
            raise ConversionError(f"tokenizer {tokenizer_path} has {tok.vocab_size} tokens but the model's "
                                  f"embedding has only {padded} rows: pass the tokenizer the model was trained with")
        tokens = special_tokens_of(tok)
    else:
        warnings.warn("no tokenizer given and the config's data.tokenizer does not exist: writing no tokenizer "
                      "files and BLOOM's special token ids (bos 1, eos 2, pad 3)", stacklevel=2)

    config_json = hf_config_dict(cfg.model, padded, target, tokens)  # fails early for unexportable shapes
    plan = _plan(cfg, padded, target, files.indices())
    tmp = prepare_output(output, overwrite)
    drift: dict[str, float] = {}
    try:
        with ShardedSafetensorsWriter(tmp, plan, parse_size(max_shard_size)) as writer:
            bar = tqdm(files.indices(), desc="export layers", unit="layer", disable=not progress, dynamic_ncols=True)
            for index in bar:
                layer = read_layer_shards(files, index)
                expected = full_shapes(cfg.model, padded, index)
                if set(layer[0]) != set(expected):
                    raise ConversionError(
                        f"layer {index} ({files.path(index, 0).name}) holds {sorted(layer[0])} but a BLOOM "
                        f"layer there holds {sorted(expected)}: check model.embed_layernorm and the checkpoint")
                for key, shape in expected.items():
                    name = layer_key_to_hf_name(index, key, cfg.model.num_layers)
                    where = f" in {files.path(index, 0).name} (and its TP siblings)"
                    if partition_dim(key) == 0:
                        # Rows split over TP: the shards, one after the other, are the merged bytes.
                        parts = [shard[key].to(target) for shard in layer]
                        merged_shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
                    else:
                        tensor, drift[name] = merge_shards(key, [shard[key] for shard in layer], where)
                        parts, merged_shape = [tensor.to(target)], tuple(tensor.shape)
                    if tuple(merged_shape) != shape:
                        raise ConversionError(
                            f"{key}{where} (merged over {files.tp_size} TP rank(s), exported as {name}) has shape "
                            f"{tuple(merged_shape)} but the config implies {shape}: check model.hidden_size and "
                            f"model.ffn_hidden_size in {source}")
                    writer.write(name, parts)
                    del parts
                del layer
            written = writer.close()
        write_json(tmp / "config.json", config_json)
        write_json(tmp / "generation_config.json", generation_config_dict(tokens))
        written += ["config.json", "generation_config.json"]
        if tokenizer_path is not None:
            written += write_tokenizer_files(tokenizer_path, tmp, tokens, cfg.model.seq_length)
        publish(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    drift = {name: value for name, value in drift.items() if value > 0}
    if drift:
        warnings.warn(f"TP-duplicated tensors differ across TP ranks (rank 0's copy was exported): "
                      f"{dict(list(drift.items())[:5])}", stacklevel=2)
    return ExportSummary(
        output=output, checkpoint_dir=directory, config_source=source, tp_size=files.tp_size,
        num_layers=files.num_layers, dtype=target, num_parameters=sum(_numel(p.shape) for p in plan),
        total_bytes=sum(p.nbytes for p in plan), files=sorted(written), seconds=time.perf_counter() - start,
        drift=drift, tokenizer=str(tokenizer_path) if tokenizer_path else None)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
