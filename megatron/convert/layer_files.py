"""Reading and writing Megatron-DeepSpeed layer files, and moving them in and out of our modules.

A checkpoint directory ``{save}/global_step{N}/`` holds one ``layer_XX-model_YY-model_states.pt``
per pipeline layer index XX and tensor-parallel rank YY (see ``megatron.convert.layout``); this
is what DeepSpeed's pipeline engine writes, and all that BLOOM's published training
checkpoints contain. ``{save}/latest`` names the newest tag.

    files = LayerFileSet.discover(resolve_checkpoint_dir("checkpoints/run", step=None))
    embedding = read_merged_layer(files, 1).tensors        # TP-merged, single-device tensors
    save_layer_files(model, "out/global_step0", parallel_state)       # this rank's files
    load_layer_files_into(model, "out", parallel_state, num_layers)   # any TP size on disk

Every file is loaded with ``torch.load(weights_only=True, mmap=True)`` where possible: the
data stays on disk until a tensor is used, so a layer of BLOOM-176B costs its own size in
memory and nothing else is read.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from megatron.convert.errors import ConversionError
from megatron.convert.layout import (EMBEDDING_INDEX, final_layernorm_index, layer_indices, merge_shards,
                                     split_full)
from megatron.utils.atomic import atomic_path, atomic_write_bytes

LAYER_FILE_PATTERN = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
_STEP_DIR = re.compile(r"^global_step(\d+)$")
_TIED_PREFIX = "tied_modules.embed."


def layer_file_name(index: int, tp_rank: int) -> str:
    """``layer_{index:02d}-model_{tp_rank:02d}-model_states.pt``."""
    return f"layer_{index:02d}-model_{tp_rank:02d}-model_states.pt"


def checkpoint_tag(step: int) -> str:
    """Megatron-DeepSpeed's directory name for the checkpoint after ``step`` iterations."""
    return f"global_step{step}"


def _has_layer_files(directory: Path) -> bool:
    return directory.is_dir() and any(LAYER_FILE_PATTERN.match(p.name) for p in directory.iterdir())


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
            found = sorted(p.name for p in root.iterdir() if _STEP_DIR.match(p.name))
            raise ConversionError(f"{chosen} has no layer files; checkpoints under {root}: {found or 'none'}")
        return chosen
    latest = root / "latest"
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8").strip()
        chosen = root / tag
        if not _has_layer_files(chosen):
            raise ConversionError(f"{latest} names '{tag}', but {chosen} has no layer_XX-model_YY-model_states.pt "
                                  "files; pass --step to choose another checkpoint")
        return chosen
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
    for _, candidate in reversed(steps):
        if _has_layer_files(candidate):
            return candidate
    raise ConversionError(f"{root} holds no layer_XX-model_YY-model_states.pt files, no 'latest' and no "
                          "global_step* directory with layer files; point at a checkpoint directory")


def checkpoint_step(directory: str | os.PathLike) -> Optional[int]:
    """N for a directory named ``global_stepN``, else None."""
    match = _STEP_DIR.match(Path(directory).name)
    return int(match.group(1)) if match else None


def is_layer_files_only(directory: str | os.PathLike) -> bool:
    """Whether a ``global_stepN`` directory holds layer files but no DeepSpeed engine state
    (``mp_rank_*_model_states.pt``, optimizer shards): an import or a published BLOOM training
    checkpoint, to be loaded with ``load_layer_files_into`` and a fresh optimizer."""
    directory = Path(directory)
    return _has_layer_files(directory) and not any(
        p.name.endswith("_model_states.pt") and p.name.startswith("mp_rank_") or p.name.endswith("optim_states.pt")
        for p in directory.iterdir())


def write_latest(root: str | os.PathLike, tag: str) -> None:
    """Write ``root/latest`` naming ``tag``, atomically."""
    path = Path(root) / "latest"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, tag.encode("utf-8"))


def load_tensor_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ``torch.save``'d flat dict of tensors, memory-mapped where the file format allows,
    loaded with ``weights_only=True`` (no arbitrary pickles)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be mapped; read them whole
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
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
            match = LAYER_FILE_PATTERN.match(p.name)
            if match:
                paths[(int(match.group(1)), int(match.group(2)))] = p
        if not paths:
            raise ConversionError(f"{directory} has no layer_XX-model_YY-model_states.pt files")
        indices = sorted({index for index, _ in paths})
        tp_size = max(rank for _, rank in paths) + 1
        num_layers = indices[-1] - 4
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


def module_key_to_layer(name: str, num_layers: Optional[int]) -> tuple[int, str]:
    """(pipeline layer index, key inside the layer file) of a state-dict entry of our model.

    Accepts the single-device ``BloomForCausalLM`` names (``embedding.*``, ``layers.{i}.*``,
    ``final_layernorm.*``) and DeepSpeed ``PipelineModule`` names (``{index}.*``,
    ``tied_modules.embed.*``); ``num_layers`` is needed only for ``final_layernorm.*``.
    """
    if name.startswith(_TIED_PREFIX):
        return EMBEDDING_INDEX, name[len(_TIED_PREFIX):]
    head, _, rest = name.partition(".")
    if head.isdigit():
        return int(head), rest
    if head == "embedding":
        return EMBEDDING_INDEX, rest
    if head == "layers":
        number, _, key = rest.partition(".")
        return 3 + int(number), key
    if head == "final_layernorm":
        if num_layers is None:
            raise ConversionError("num_layers is needed to place final_layernorm.* in a layer file")
        return final_layernorm_index(num_layers), rest
    raise ConversionError(f"state-dict entry '{name}' belongs to no BLOOM pipeline layer")


def _coords(parallel_state: Any) -> tuple[int, int, int, int, bool]:
    """(tp_rank, tp_size, dp_rank, pp_size, first_stage) from a ParallelState or None."""
    if parallel_state is None:
        return 0, 1, 0, 1, True
    return (parallel_state.tp_rank, parallel_state.tp_size, parallel_state.dp_rank, parallel_state.pp_size,
            parallel_state.is_pipeline_first_stage())


def _num_layers_of(module: nn.Module) -> Optional[int]:
    cfg = getattr(module, "cfg", None)
    return getattr(cfg, "num_layers", None)


def _group_by_layer(names, num_layers: Optional[int]) -> dict[int, list[tuple[str, str]]]:
    grouped: dict[int, list[tuple[str, str]]] = {}
    for name in names:
        index, key = module_key_to_layer(name, num_layers)
        grouped.setdefault(index, []).append((name, key))
    return grouped


def save_layer_files(module: nn.Module, checkpoint_dir: str | os.PathLike, parallel_state: Any = None,
                     num_layers: Optional[int] = None) -> list[Path]:
    """Write this rank's layer files of ``module`` into ``checkpoint_dir`` (one per layer index).

    ``module`` is our single-stage ``BloomForCausalLM`` or a DeepSpeed ``PipelineModule`` (this
    stage's layers; the LM head's copy of the tied embedding is written only by the first stage,
    as DeepSpeed does). Only data-parallel rank 0 writes; each file is written atomically.
    Returns the paths written by this rank.
    """
    tp_rank, _, dp_rank, pp_size, first_stage = _coords(parallel_state)
    if dp_rank != 0:
        return []
    state = module.state_dict()
    names = [n for n in state if not (n.startswith(_TIED_PREFIX) and pp_size > 1 and not first_stage)]
    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for index, entries in sorted(_group_by_layer(names, num_layers or _num_layers_of(module)).items()):
        layer_state = {key: state[name].detach().to("cpu").clone().contiguous() for name, key in entries}
        path = directory / layer_file_name(index, tp_rank)
        with atomic_path(path) as tmp:
            torch.save(layer_state, tmp)
        written.append(path)
    return written


@torch.no_grad()
def load_layer_files_into(module: nn.Module, checkpoint_dir: str | os.PathLike, parallel_state: Any = None,
                          num_layers: Optional[int] = None, step: Optional[int] = None) -> dict[str, Any]:
    """Fill ``module``'s parameters (and persistent buffers) from a checkpoint's layer files.

    ``module`` is our single-stage ``BloomForCausalLM`` (TP-sharded or not) or a DeepSpeed
    ``PipelineModule`` holding one stage; ``parallel_state`` (a ``ParallelState``, or None for one
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
    tp_rank, tp_size, _, _, _ = _coords(parallel_state)
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
    return {"directory": directory, "step": checkpoint_step(directory), "source_tp_size": files.tp_size,
            "tensors": loaded, "files": files_read}
