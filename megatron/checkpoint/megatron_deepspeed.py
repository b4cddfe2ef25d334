"""Checkpoints written by Megatron-DeepSpeed itself (BLOOM's training checkpoints): no manifest of
ours, everything else in the same layout.

Megatron-DeepSpeed's ``save_checkpoint`` hands DeepSpeed a client state of its own
(``args``: its ``argparse.Namespace``; ``checkpoint_version``; ``iteration``; ``tokens``;
``checkpoint_info``; the random states as flat keys ``random_rng_state`` ... ``rng_tracker_states``),
and DeepSpeed writes the layer files, ``mp_rank_XX_model_states.pt``, the ZeRO or BF16_Optimizer
shards and ``latest``. Such a directory is complete when every file that layout implies is
there and is an intact archive whose pickle passes the allow-list scan
(megatron/checkpoint/pickle_scan.py); :func:`describe` then gives what our manifest would
(layout, loop state, model shape), read from the files with the restricted unpickler.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from megatron.checkpoint.layer_files import LayerFileSet
from megatron.checkpoint.layout import (
    MANIFEST_FILE,
    OPTIMIZER_STATE_SUFFIX,
    engine_state_file_name,
    iteration_of,
)
from megatron.checkpoint.pickle_scan import safe_load, scan_file
from megatron.errors import ConversionError

FORMAT = "megatron-deepspeed"
_OPTIMIZER_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_" + re.escape(OPTIMIZER_STATE_SUFFIX) + "$")


def is_megatron_deepspeed_checkpoint(path: Path) -> bool:
    """Whether ``path`` looks like a checkpoint Megatron-DeepSpeed wrote: engine state files and no
    manifest of ours (completeness is :func:`verify`'s job)."""
    return (path.is_dir() and not (path / MANIFEST_FILE).exists()
            and (path / engine_state_file_name(0)).is_file())


def optimizer_files(path: Path) -> dict[tuple[int, int], Path]:
    """ZeRO / BF16_Optimizer shards by (data-parallel rank, model-parallel rank)."""
    found = {}
    for file in path.iterdir():
        match = _OPTIMIZER_FILE.match(file.name)
        if match:
            found[(int(match.group(2)), int(match.group(3)))] = file
    return found


def verify(path: Path) -> list[str]:
    """Problems that make Megatron-DeepSpeed checkpoint ``path`` unusable (empty when complete).

    Checks that the engine, optimizer and layer files of its layout are all there and that every
    ``.pt`` file passes the pickle scan (an untrusted type is reported, never loaded)."""
    problems = []
    for file in sorted(path.glob("*.pt")):
        try:
            scan_file(file)
        except ConversionError as exc:
            problems.append(str(exc))
    if problems:
        return problems
    try:
        describe(path)
    except ConversionError as exc:
        problems.append(str(exc))
    return problems


def describe(path: Path) -> dict[str, Any]:
    """Manifest-like facts of Megatron-DeepSpeed checkpoint ``path``: ``layout``, ``train_state``,
    ``config.model``, ``padded_vocab_size``, ``pipelined`` (model in layer files, parameters named
    by pipeline index) and ``files``. Raises ConversionError naming what is missing or inconsistent."""
    first = path / engine_state_file_name(0)
    state = safe_load(first)
    args = state.get("args")
    if args is None:
        raise ConversionError(f"{path / MANIFEST_FILE} is missing and {first.name} has no 'args' (Megatron-DeepSpeed's "
                              "client state): the save was interrupted, or the directory was written by other code")
    tp = int(getattr(args, "tensor_model_parallel_size", 1))
    pp = int(getattr(args, "pipeline_model_parallel_size", 1))
    engine_files = [engine_state_file_name(i) for i in range(tp * pp)]
    missing = [name for name in engine_files if not (path / name).is_file()]
    shards = optimizer_files(path)
    dp = int(state.get("dp_world_size") or 1 + max((d for d, _ in shards), default=0))
    missing += [f"zero_pp_rank_{d}_mp_rank_{m:02d}_{OPTIMIZER_STATE_SUFFIX}" for d in range(dp) for m in range(tp * pp)
                if (d, m) not in shards]
    if missing:
        raise ConversionError(f"{path} is a Megatron-DeepSpeed checkpoint of TP{tp} PP{pp} DP{dp} (its args) but "
                              f"{len(missing)} of its files are missing: {missing[:6]}; copy them from the source")
    pipelined = state.get("module") is None
    if pipelined:
        LayerFileSet.discover(path)  # raises naming missing layer files
    bf16 = any(name.name.startswith("bf16_") for name in shards.values())
    if bf16:
        # DeepSpeed's BF16_Optimizer (BLOOM's: bf16 with "stage": 0 in its DeepSpeed config) shards
        # the optimizer over data-parallel ranks as ZeRO-1 does, in the files bf16 + ZeRO-1 writes
        # here: the same layout, so no conversion for that difference alone.
        zero_stage = 1
    else:
        optimizer = safe_load(shards[(0, 0)])["optimizer_state_dict"]
        zero_stage = int(getattr(optimizer.get("zero_stage"), "value", optimizer.get("zero_stage", 0)) or 0)
    iteration = int(state.get("iteration", state.get("global_steps", iteration_of(path) or 0)))
    consumed = int(getattr(args, "consumed_train_samples", 0))
    tokens = int(state.get("tokens", getattr(args, "consumed_train_tokens", 0)) or 0)
    model = {key: getattr(args, key) for key in ("num_layers", "hidden_size", "num_attention_heads", "embed_layernorm")
             if hasattr(args, key)}
    return {
        "format": FORMAT,
        "layout": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "data_parallel_size": dp,
                   "world_size": tp * pp * dp, "zero_stage": zero_stage, "bf16": bool(getattr(args, "bf16", bf16)),
                   "fp16": bool(getattr(args, "fp16", False)), "pipelined": pipelined},
        "train_state": {"iteration": iteration, "consumed_samples": consumed, "consumed_tokens": tokens},
        "config": {"model": model},
        "padded_vocab_size": getattr(args, "padded_vocab_size", None),
        "files": {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()},
    }


def train_state(client_state: dict[str, Any]) -> dict[str, Any]:
    """Our loop state from Megatron-DeepSpeed's client state (``iteration``, ``tokens``, and
    ``args.consumed_train_samples``: what its ``load_checkpoint`` restores)."""
    args = client_state.get("args")
    return {"iteration": int(client_state["iteration"]),
            "consumed_samples": int(getattr(args, "consumed_train_samples", 0)),
            "consumed_tokens": int(client_state.get("tokens", getattr(args, "consumed_train_tokens", 0)) or 0)}


def rng_state(client_state: dict[str, Any], dp_rank: int) -> dict[str, Any] | None:
    """The random streams Megatron-DeepSpeed saved for data-parallel rank ``dp_rank``; None when it
    saved none.

    BigScience's fork (BLOOM's) stores data-parallel rank 0's streams as flat keys and restores
    them on every rank; Microsoft's later fork stores a list with every data-parallel rank's
    (``rng_state``), as this framework does."""
    keys = ("random_rng_state", "np_rng_state", "torch_rng_state", "cuda_rng_state", "rng_tracker_states")
    per_rank = client_state.get("rng_state")
    if isinstance(per_rank, list) and per_rank:
        return per_rank[dp_rank] if dp_rank < len(per_rank) else None
    if "random_rng_state" not in client_state:
        return None
    return {key: client_state.get(key) for key in keys}
