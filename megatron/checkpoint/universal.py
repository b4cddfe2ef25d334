"""Resuming on another layout: DeepSpeed's universal checkpoint, with BLOOM's merge rules.

A ZeRO checkpoint stores each rank's flat shard of fp32 weights and Adam moments; it loads only
on the same TP x PP x DP grid. ``deepspeed.checkpoint.ds_to_universal`` rewrites it as one
folder per parameter (``zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt``) holding the full,
unsharded tensor, from which an engine of any layout takes its slices when built with
``{"checkpoint": {"load_universal": true}}``.

Merging TP slices needs to know each parameter's kind, which the checkpoint must carry as the
client state ``universal_checkpoint_info`` (:func:`universal_checkpoint_info`), whose patterns
megatron/model/layout.py derives from its partition-dimension table:

* TP-replicated (LayerNorms, row-parallel biases): every TP rank holds the whole tensor; take
  one copy. Without this rule, loading at another TP fails with "full param numel ... !=
  tensor slice numel" (DeepSpeed issue 6503).
* row-parallel weights (attention ``dense``, ``dense_4h_to_h``): concatenated on dim 1;
  everything else (QKV, ``dense_h_to_4h`` and their biases, the embedding) on dim 0. The fused
  QKV rows are [head, (q, k, v), head_dim] and TP splits whole heads, so dim 0 is right.
* the vocabulary matrix: marked so a target with a larger padded vocabulary gets zero rows
  appended. ``original_vocab_size`` is set to the *padded* size saved, so the converter keeps
  the trained padding rows (their logits take part in the softmax; stripping them would change
  the loss).
* pipeline-replicated (the tied embedding module, present on the first and last stage): taken
  from the first stage only. The last stage's copy of the embedding LayerNorm is never used
  there, so only the first stage's is meaningful.

Every pattern must match some parameter (the converter checks), so the patterns are written
for both namings of our two engines. The converted folders are named after the saving
engine's parameters; :func:`rename_parameters` renames them for the loading engine (single
module ``layers.0...`` versus pipeline ``3...``).

The conversion itself (streaming, resumable, in worker processes) is
megatron/checkpoint/universal_conversion.py; it reads the source with the restricted unpickler.
DeepSpeed's loader then reads the converted files with ``torch.load(weights_only=False)``:
they are written by the converter, from scanned sources.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from megatron.config import Config
from megatron.model.layout import (
    flat_name,
    is_pipeline_name,
    name_patterns,
    pipeline_name,
    pipeline_replicated_pattern,
    vocabulary_pattern,
)
from megatron.utils.atomic import atomic_write_text

UNIVERSAL_MARKER = "universal.json"  # written last: the conversion is complete


def universal_checkpoint_info(cfg: Config) -> dict[str, Any]:
    """The ``universal_checkpoint_info`` client state for BLOOM's parameters (see module docstring)."""
    return universal_checkpoint_info_for(cfg.model.embed_layernorm, cfg.padded_vocab_size)


def universal_checkpoint_info_for(embed_layernorm: bool, padded: int) -> dict[str, Any]:
    """:func:`universal_checkpoint_info` from the two facts it depends on (for a checkpoint
    without a config of ours, e.g. one Megatron-DeepSpeed wrote)."""
    from deepspeed.checkpoint import constants as c

    return {
        c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        c.TP_REPLICATED_PARAMETER_PATTERNS: name_patterns(embed_layernorm, split_on=None),
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: name_patterns(embed_layernorm, split_on=1),
        c.VOCABULARY_PARAMETER_PATTERNS: [vocabulary_pattern()],
        c.PIPELINE_REPLICATED_PARAMETER_PATTERNS: [pipeline_replicated_pattern()],
        c.ORIGINAL_VOCAB_SIZE: padded,
        c.PADDED_VOCAB_SIZE: padded,
    }


def is_complete(universal_dir: Path) -> bool:
    """Whether a conversion finished (its marker exists)."""
    return (universal_dir / UNIVERSAL_MARKER).is_file()


def rename_parameters(universal_dir: Path, pipelined_target: bool, num_layers: int) -> None:
    """Rename ``zero/<parameter>`` folders into the loading engine's naming, in place.

    Each folder is renamed on its own and the new naming recorded last, so a rename interrupted
    halfway is finished by the next call.
    """
    marker = universal_dir / UNIVERSAL_MARKER
    info = json.loads(marker.read_text())
    wanted = "pipeline" if pipelined_target else "flat"
    if info.get("naming") == wanted:
        return
    zero = universal_dir / "zero"
    for folder in sorted(p for p in zero.iterdir() if p.is_dir()):
        if is_pipeline_name(folder.name) == pipelined_target:
            continue
        new = pipeline_name(folder.name, num_layers) if pipelined_target else flat_name(folder.name, num_layers)
        os.rename(folder, zero / new)
    info["naming"] = wanted
    atomic_write_text(marker, json.dumps(info) + "\n")


def _naming_of(universal_dir: Path) -> str:
    names = [p.name for p in (universal_dir / "zero").iterdir() if p.is_dir()]
    return "pipeline" if any(is_pipeline_name(n) for n in names) else "flat"
