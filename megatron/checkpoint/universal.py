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

Loading note: the converter and DeepSpeed's loader read these files with
``torch.load(weights_only=False)``; convert only checkpoints you trust.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

from megatron.checkpoint.layout import LATEST_UNIVERSAL_FILE
from megatron.config import Config
from megatron.model.layout import (
    flat_name,
    is_pipeline_name,
    name_patterns,
    pipeline_name,
    pipeline_replicated_pattern,
    vocabulary_pattern,
)
from megatron.utils.atomic import atomic_write_text, fsync_path, fsync_tree

UNIVERSAL_MARKER = "universal.json"  # written last: the conversion is complete


def universal_checkpoint_info(cfg: Config) -> dict[str, Any]:
    """The ``universal_checkpoint_info`` client state for BLOOM's parameters (see module docstring)."""
    from deepspeed.checkpoint import constants as c

    embed_layernorm = cfg.model.embed_layernorm
    padded = cfg.padded_vocab_size
    return {
        c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        c.TP_REPLICATED_PARAMETER_PATTERNS: name_patterns(embed_layernorm, split_on=None),
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: name_patterns(embed_layernorm, split_on=1),
        c.VOCABULARY_PARAMETER_PATTERNS: [vocabulary_pattern()],
        c.PIPELINE_REPLICATED_PARAMETER_PATTERNS: [pipeline_replicated_pattern()],
        c.ORIGINAL_VOCAB_SIZE: padded,
        c.PADDED_VOCAB_SIZE: padded,
    }


def convert_to_universal(checkpoint_dir: Path, output_dir: Path, pipelined_target: bool, num_layers: int,
                         workers: int = 1) -> None:
    """Convert ``checkpoint_dir`` (a ``global_stepN`` folder) into ``output_dir`` atomically.

    Writes into ``<output_dir>.tmp`` and renames when done, with :data:`UNIVERSAL_MARKER` last;
    the parameter folders are named for a pipelined (or single-module) target.
    ``workers`` > 1 extracts shards in a process pool (faster for big models, forks the caller).
    """
    from deepspeed.checkpoint import ds_to_universal

    staging = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(checkpoint_dir), output_folder=str(staging),
                              num_extract_workers=workers, num_merge_workers=workers, keep_temp_folder=False,
                              strict=True, inject_missing_state=False)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # the converter prints every step and a progress bar
            ds_to_universal.main(args)
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"converting {checkpoint_dir} to a universal checkpoint failed ({exc!r}); its output "
                           f"was:\n{log.getvalue()[-2000:]}") from exc
    source_naming = _naming_of(staging)
    (staging / UNIVERSAL_MARKER).write_text(json.dumps({"source": str(checkpoint_dir.name),
                                                        "naming": source_naming}) + "\n")
    rename_parameters(staging, pipelined_target, num_layers)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    fsync_tree(staging)
    os.rename(staging, output_dir)
    fsync_path(output_dir.parent)
    # The converter pointed DeepSpeed's ``latest_universal`` at the staging name; name the result.
    atomic_write_text(output_dir.parent / LATEST_UNIVERSAL_FILE, output_dir.name)


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
