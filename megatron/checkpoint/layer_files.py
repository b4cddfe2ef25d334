"""Reading and writing Megatron-DeepSpeed layer files, and moving them in and out of our modules.

A checkpoint directory ``{save}/global_step{N}/`` holds one ``layer_XX-model_YY-model_states.pt``
per pipeline layer index XX and tensor-parallel rank YY (see megatron/model/layout.py); this
is what DeepSpeed's pipeline engine writes, and all that BLOOM's published training
checkpoints contain. ``{save}/latest`` names the newest tag.

    files = LayerFileSet.discover(resolve_checkpoint_dir("checkpoints/run", step=None))
    embedding = read_merged_layer(files, 1).tensors        # TP-merged, single-device tensors
    save_layer_files(model, "out/global_step0", parallel)       # this rank's files
    load_layer_files_into(model, "out", parallel, num_layers)   # any TP size on disk

Every file is loaded with ``torch.load(weights_only=True, mmap=True)`` where possible: the
data stays on disk until a tensor is used, so a layer of BLOOM-176B costs its own size in
memory and nothing else is read.

Every layer file is written by :func:`write_layer_file`: training (without a pipeline; with one,
DeepSpeed writes the same files) and the transformers import both call it. It writes in place:
callers make the whole directory appear at once (a temporary ``global_stepN`` name renamed when
complete), which is cheaper than a rename per file and leaves no half-checkpoint behind.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from megatron.checkpoint.layout import (
    LATEST_FILE,
    checkpoint_tag,
    is_engine_or_optimizer_file,
    iteration_of,
    layer_file_name,
    parse_layer_file_name,
)
from megatron.checkpoint.resharding import merge_shards, split_full
from megatron.core.parallel_state import ParallelState
from megatron.errors import ConversionError
from megatron.model.layout import TIED_PREFIX, layer_indices, module_key_to_layer, num_layers_of


def _has_layer_files(directory: Path) -> bool:
    return directory.is_dir() and any(parse_layer_file_name(p.name) for p in directory.iterdir())


def resolve_checkpoint_dir(path: str | os.PathLike, step: Optional[int] = None) -> Path:
    """The ``global_stepN`` directory to read: ``path`` itself when it holds layer files, else
    ``path/global_step{step}``, else the tag named by ``path/latest``, else the highest
    ``global_step*`` subdirectory that holds layer files."""
    root = Path(path)
    if not root.is_dir():
        raise ConversionError(f"checkpoint directory {root} does not exist")
    if _has_layer_files(root):
        if step is not None and root.name != checkpoint_tag(step):
            raise ConversionError(f"{root} is itself a checkpoint directory, not {checkpoint_tag(step)}: "
                                  "drop --step or pass the directory that holds the global_step* folders")
        return root
    if step is not None:
        chosen = root / checkpoint_tag(step)
        if not _has_layer_files(chosen):
            found = sorted(p.name for p in root.iterdir() if iteration_of(p.name) is not None)
            raise ConversionError(f"{chosen} has no layer files; checkpoints under {root}: {found or 'none'}")
        return chosen
    latest = root / LATEST_FILE
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8").strip()
        chosen = root / tag
        if not _has_layer_files(chosen):
            raise ConversionError(f"{latest} names '{tag}', but {chosen} has no layer_XX-model_YY-model_states.pt "
                                  "files; pass --step to choose another checkpoint")
        return chosen
    steps = sorted((step, p) for p in root.iterdir() if (step := iteration_of(p.name)) is not None)
    for _, candidate in reversed(steps):
        if _has_layer_files(candidate):
            return candidate
    raise ConversionError(f"{root} holds no layer_XX-model_YY-model_states.pt files, no 'latest' and no "
                          "global_step* directory with layer files; point at a checkpoint directory")


def is_layer_files_only(directory: str | os.PathLike) -> bool:
    """Whether a ``global_stepN`` directory holds layer files but no DeepSpeed engine state
    (``mp_rank_*_model_states.pt``, optimizer shards): an import or a published BLOOM training
    checkpoint, to be loaded with ``load_layer_files_into`` and a fresh optimizer."""
    directory = Path(directory)
    return _has_layer_files(directory) and not any(is_engine_or_optimizer_file(p.name) for p in directory.iterdir())


def load_tensor_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ``torch.save``'d flat dict of tensors, memory-mapped where the file format allows,
    loaded with ``weights_only=True`` (no arbitrary pickles)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be mapped; read them whole
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            # torch's message is a page of advice about weights_only=False; keep its one line of cause.
            cause = next((ln.strip() for ln in str(err).splitlines() if "WeightsUnpickler error" in ln), str(err))
            raise ConversionError(f"cannot load {path}: it holds objects other than tensors, which "
                                  f"torch.load(weights_only=True) refuses ({cause}); re-save it with tensors only, "
                                  "or convert it where you trust its source") from None
        except Exception as err:  # noqa: BLE001
            raise ConversionError(f"cannot load {path}: {type(err).__name__}: {err}; the file is truncated, "
                                  "corrupt, or holds objects other than tensors") from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} does not hold a flat dict of tensors (a layer's state dict)")
    return dict(state)


@dataclass
class LayerFileSet:
    """The layer files of one checkpoint directory: TP size, number of blocks, file paths."""

    directory: Path
    tp_size: int
    num_layers: int
    paths: dict[tuple[int, int], Path] = field(repr=False)

    @classmethod
    def discover(cls, directory: str | os.PathLike) -> "LayerFileSet":
        """Index ``directory``'s layer files; fails when a layer or a TP rank's file is missing."""
        directory = Path(directory)
        paths = {}
        for p in directory.iterdir() if directory.is_dir() else ():
            coordinates = parse_layer_file_name(p.name)
            if coordinates:
                paths[coordinates] = p
        if not paths:
            raise ConversionError(f"{directory} has no layer_XX-model_YY-model_states.pt files")
        indices = sorted({index for index, _ in paths})
        tp_size = max(rank for _, rank in paths) + 1
        num_layers = num_layers_of(indices)
        expected = layer_indices(num_layers) if num_layers >= 1 else []
        if indices != expected:
            raise ConversionError(
                f"{directory}: layer files for pipeline indices {indices} do not form a BLOOM "
                f"(expected 1, 3..L+2, L+4); missing {sorted(set(expected) - set(indices))}, unexpected "
                f"{sorted(set(indices) - set(expected))}: copy the missing files or use a complete checkpoint")
        missing = [layer_file_name(i, r) for i in indices for r in range(tp_size) if (i, r) not in paths]
        if missing:
            raise ConversionError(f"{directory}: tensor-parallel size is {tp_size} but these layer files are "
                                  f"missing: {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        return cls(directory, tp_size, num_layers, paths)

    def path(self, index: int, tp_rank: int) -> Path:
        """The file of layer ``index`` written by TP rank ``tp_rank``."""
        return self.paths[(index, tp_rank)]

    def indices(self) -> list[int]:
        """Pipeline layer indices in model order."""
        return layer_indices(self.num_layers)


@dataclass
class MergedLayer:
    """A layer's single-device tensors, and how far duplicated tensors drifted across TP ranks."""

    index: int
    tensors: dict[str, torch.Tensor]
    drift: dict[str, float]


def read_layer_shards(files: LayerFileSet, index: int) -> list[dict[str, torch.Tensor]]:
    """Every TP rank's state dict of layer ``index`` (memory-mapped), checked to hold the same keys."""
    shards = [load_tensor_file(files.path(index, r)) for r in range(files.tp_size)]
    keys = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(keys):
            raise ConversionError(f"{files.path(index, rank)} holds keys {sorted(shard)} but "
                                  f"{files.path(index, 0).name} holds {sorted(keys)}")
    return shards


def read_merged_layer(files: LayerFileSet, index: int) -> MergedLayer:
    """Load every TP rank's file of layer ``index`` and merge them into single-device tensors."""
    shards = read_layer_shards(files, index)
    keys = list(shards[0])
    where = f" in {files.path(index, 0).name} (and its TP siblings)"
    tensors, drift = {}, {}
    for key in keys:
        tensors[key], drift[key] = merge_shards(key, [s[key] for s in shards], where)
    return MergedLayer(index, tensors, {k: v for k, v in drift.items() if v > 0})


# ---------------------------------------------------------------------------------------------
# Our modules <-> layer files


def _coords(parallel: Optional[ParallelState]) -> tuple[int, int, int]:
    """(tp_rank, tp_size, dp_rank) of this rank; None means one device."""
    if parallel is None:
        return 0, 1, 0
    return parallel.tp_rank, parallel.tp_size, parallel.dp_rank


def _holds_head_copy_only(parallel: Optional[ParallelState]) -> bool:
    """Whether this stage's tied embedding is only the LM head's copy (a later pipeline stage)."""
    return parallel is not None and parallel.pp_enabled and not parallel.is_pipeline_first_stage()


def _num_layers_of(module: nn.Module) -> Optional[int]:
    cfg = getattr(module, "cfg", None)
    return getattr(cfg, "num_layers", None)


def _group_by_layer(names, num_layers: Optional[int]) -> dict[int, list[tuple[str, str]]]:
    grouped: dict[int, list[tuple[str, str]]] = {}
    for name in names:
        index, key = module_key_to_layer(name, num_layers)
        grouped.setdefault(index, []).append((name, key))
    return grouped


def write_layer_file(directory: str | os.PathLike, index: int, tp_rank: int,
                     tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write one layer file: TP rank ``tp_rank``'s tensors of pipeline layer ``index`` (keys as in
    the layer, e.g. ``mlp.dense_h_to_4h.weight``), on the CPU, each with storage of its own.

    Own storage matters: ``torch.save`` writes a view's whole underlying buffer, and ZeRO keeps
    parameters as views into one flat buffer per rank, as a TP split keeps chunks of the full
    tensor. Writes in place (see the module docstring for why that is safe).
    """
    path = Path(directory) / layer_file_name(index, tp_rank)
    torch.save({key: _own_cpu_copy(tensor) for key, tensor in tensors.items()}, path)
    return path


def _own_cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    owns_storage = (tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.storage_offset() == 0
                    and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())
    return tensor if owns_storage else tensor.to("cpu", copy=True, memory_format=torch.contiguous_format)


def save_layer_files(module: nn.Module, checkpoint_dir: str | os.PathLike, parallel: Optional[ParallelState] = None,
                     num_layers: Optional[int] = None) -> list[Path]:
    """Write this rank's layer files of ``module`` into ``checkpoint_dir`` (one per layer index).

    ``module`` is our single-stage ``BloomForCausalLM`` or a DeepSpeed ``PipelineModule`` (this
    stage's layers; the LM head's copy of the tied embedding is written only by the first stage,
    as DeepSpeed does). Only data-parallel rank 0 writes. Returns the paths written by this rank.
    """
    tp_rank, _, dp_rank = _coords(parallel)
    if dp_rank != 0:
        return []
    state = module.state_dict()
    skip_tied = _holds_head_copy_only(parallel)
    names = [n for n in state if not (skip_tied and n.startswith(TIED_PREFIX))]
    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    return [write_layer_file(directory, index, tp_rank, {key: state[name] for name, key in entries})
            for index, entries in sorted(_group_by_layer(names, num_layers or _num_layers_of(module)).items())]


@torch.no_grad()
def load_layer_files_into(module: nn.Module, checkpoint_dir: str | os.PathLike,
                          parallel: Optional[ParallelState] = None, num_layers: Optional[int] = None,
                          step: Optional[int] = None) -> dict[str, Any]:
    """Fill ``module``'s parameters (and persistent buffers) from a checkpoint's layer files.

    ``module`` is our single-stage ``BloomForCausalLM`` (TP-sharded or not) or a DeepSpeed
    ``PipelineModule`` holding one stage; ``parallel`` (a ``ParallelState``, or None for one
    device) gives this rank's TP rank and size. The files may have been written at any TP size:
    when it differs from the running one, each layer's shards are merged and re-split for this
    rank. ``checkpoint_dir`` is a ``global_stepN`` directory or a save root (``latest`` or
    ``step`` picks the tag). Call it before ``deepspeed.initialize`` so the optimizer's master
    weights start from the loaded values. Every tensor of the module must be found with the
    right shape, else ConversionError names it.

    Returns ``{"directory", "step", "source_tp_size", "tensors", "files"}`` (``step``: N of
    the ``global_stepN`` directory read, or None).
    """
    directory = resolve_checkpoint_dir(checkpoint_dir, step)
    files = LayerFileSet.discover(directory)
    num_layers = num_layers or _num_layers_of(module) or files.num_layers
    if num_layers != files.num_layers:
        raise ConversionError(f"the model has {num_layers} transformer layers but {directory} holds "
                              f"{files.num_layers}: check model.num_layers in the config")
    tp_rank, tp_size, _ = _coords(parallel)
    targets = dict(module.state_dict(keep_vars=True))
    loaded, files_read = 0, 0
    for index, entries in sorted(_group_by_layer(targets, num_layers).items()):
        if files.tp_size == tp_size:
            source = files.path(index, tp_rank)
            tensors = load_tensor_file(source)
            files_read += 1
            where = str(source)
        else:
            tensors = read_merged_layer(files, index).tensors
            files_read += files.tp_size
            tensors = {key: split_full(key, t, tp_rank, tp_size) for key, t in tensors.items()}
            where = (f"{files.path(index, 0).name} and its {files.tp_size - 1} TP siblings, re-split for "
                     f"TP rank {tp_rank} of {tp_size}")
        for name, key in entries:
            if key not in tensors:
                raise ConversionError(f"{where} has no '{key}' (needed for the model's '{name}'); it holds "
                                      f"{sorted(tensors)}")
            source_tensor, target = tensors[key], targets[name]
            if tuple(source_tensor.shape) != tuple(target.shape):
                raise ConversionError(
                    f"'{key}' in {where} has shape {tuple(source_tensor.shape)} but the model's '{name}' has "
                    f"shape {tuple(target.shape)}: check model.hidden_size, num_attention_heads, ffn_hidden_size "
                    "and the padded vocabulary (model.pad_vocab_size_to) against the checkpoint")
            target.copy_(source_tensor)
            loaded += 1
    return {"directory": directory, "step": iteration_of(directory), "source_tp_size": files.tp_size,
            "tensors": loaded, "files": files_read}
