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
    {save}/global_step{N}_universal.tmp/               a conversion under way, or interrupted (resumable)
    {save}/global_step{N}_universal.failed             why an in-job conversion failed (read by waiting ranks)

XX is BLOOM's pipeline layer index (megatron/model/layout.py). With a pipeline, DeepSpeed's
``PipelineModule`` writes the layer files itself; without one, megatron/checkpoint/layer_files.py
writes the same files, so every checkpoint has the same model files whatever the layout.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

TAG_PREFIX = "global_step"
TAG_PATTERN = re.compile(rf"^{TAG_PREFIX}(\d+)$")
UNIVERSAL_SUFFIX = "_universal"
UNIVERSAL_STAGING_SUFFIX = ".tmp"
UNIVERSAL_FAILED_SUFFIX = ".failed"
LATEST_FILE = "latest"
LATEST_ITERATION_FILE = "latest_checkpointed_iteration.txt"  # Megatron's name
MANIFEST_FILE = "manifest.json"
LATEST_UNIVERSAL_FILE = "latest_universal"  # DeepSpeed's ds_to_universal writes it
LAYER_FILE_PATTERN = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
ENGINE_STATE_PATTERN = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
OPTIMIZER_STATE_SUFFIX = "optim_states.pt"


def checkpoint_tag(iteration: int) -> str:
    """Megatron-DeepSpeed's directory name for the checkpoint after ``iteration`` steps."""
    return f"{TAG_PREFIX}{iteration}"


def iteration_of(tag: str | os.PathLike) -> Optional[int]:
    """N of a ``global_stepN`` name (or a path ending in one); None for any other name."""
    match = TAG_PATTERN.match(Path(tag).name)
    return int(match.group(1)) if match else None


def universal_tag(tag: str) -> str:
    """Directory name of the universal conversion of checkpoint ``tag``."""
    return f"{tag}{UNIVERSAL_SUFFIX}"


def layer_file_name(layer_index: int, tp_rank: int) -> str:
    """``layer_XX-model_YY-model_states.pt``, as DeepSpeed's PipelineModule names it."""
    return f"layer_{layer_index:02d}-model_{tp_rank:02d}-model_states.pt"


def engine_state_file_name(mp_rank: int) -> str:
    """``mp_rank_MM_model_states.pt``: DeepSpeed's engine state (and our client state) of one
    model-parallel rank."""
    return f"mp_rank_{mp_rank:02d}_model_states.pt"


def is_engine_or_optimizer_file(name: str) -> bool:
    """Whether ``name`` is DeepSpeed engine or optimizer state (not a layer file)."""
    return bool(ENGINE_STATE_PATTERN.match(name)) or name.endswith(OPTIMIZER_STATE_SUFFIX)


def parse_layer_file_name(name: str) -> Optional[tuple[int, int]]:
    """(layer index, TP rank) of a layer file's name; None for any other name."""
    match = LAYER_FILE_PATTERN.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None
