"""Streaming, resumable conversion of a ZeRO-1/2 (or BF16_Optimizer) checkpoint to DeepSpeed's
universal format: the code behind ``tools/convert_checkpoint.py`` and the in-job conversion.

DeepSpeed's ``ds_to_universal`` loads every optimizer shard whole into memory (one per extract
worker) and starts from scratch after an interruption. This converter writes the same output
(``zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt``, ``zero/optimizer_state.pt``, the
``mp_rank_*`` files), merged by DeepSpeed's own ``merge_tp_slices`` (the TP rules of
megatron/checkpoint/universal.py), in three phases:

1. **extract** (one task per optimizer shard, in worker processes): the shard is memory-mapped;
   each parameter's fragment of the fp32 weights and Adam moments is copied out and written to
   ``tmp/<param>/<tp>/<state>.<dp>``, then its pages are dropped from the mapping, so a worker
   holds one fragment at a time, not the shard;
2. **merge** (one task per parameter, in worker processes): the parameter's fragments of one
   state are concatenated over data-parallel ranks and merged over TP ranks: a worker holds one
   parameter's shards of one state, and its merged tensor;
3. **finish**: parameters without optimizer state, the common optimizer state, the engine files,
   then the completion marker (megatron/checkpoint/universal.py) and one rename.

Everything is written under ``<output>.tmp``; ``<output>`` appears by rename only when complete,
so a partial output is never taken for a finished one. Each finished task leaves a marker under
``<output>.tmp/progress``: a conversion started again after an interruption skips the shards and
parameters already done (the markers also record which source they belong to; another source
starts afresh). Every source file is read with the restricted unpickler
(megatron/checkpoint/pickle_scan.py). ZeRO-3 checkpoints (no pipeline; small models here) go
through DeepSpeed's converter instead.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import io
import json
import logging
import mmap
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from megatron.checkpoint import universal
from megatron.checkpoint.layout import LATEST_UNIVERSAL_FILE, UNIVERSAL_STAGING_SUFFIX, engine_state_file_name
from megatron.checkpoint.megatron_deepspeed import optimizer_files
from megatron.checkpoint.pickle_scan import safe_load, scan_files
from megatron.errors import ConversionError
from megatron.model.layout import VOCABULARY_KEY, is_pipeline_name
from megatron.utils.atomic import atomic_write_text, disk_full_reason, fsync_path, fsync_tree

logger = logging.getLogger(__name__)

STAGING_SUFFIX = UNIVERSAL_STAGING_SUFFIX
_PROGRESS = "progress"
_FRAGMENTS = "tmp"  # DeepSpeed's merge reads fragments from here
MIN_BYTES_FOR_WORKERS = 256 * 2**20


@dataclass
class ConversionReport:
    """What a conversion did and how long each phase took."""

    source: Path
    output: Path
    source_bytes: int
    parameters: int = 0
    shards: int = 0
    resumed_shards: int = 0  # skipped: extracted by an earlier, interrupted run
    resumed_parameters: int = 0
    workers: int = 1  # extract workers
    merge_workers: int = 1
    seconds: dict[str, float] = field(default_factory=dict)
    reused: bool = False  # the output was already complete

    @property
    def total_seconds(self) -> float:
        """Wall time of all phases."""
        return sum(self.seconds.values())

    def summary(self) -> str:
        """One line per phase and a total, for logs and the CLI."""
        if self.reused:
            return f"{self.output} is already a complete universal checkpoint: nothing to do"
        rate = self.source_bytes / 1e9 / self.total_seconds if self.total_seconds else float("nan")
        phases = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.seconds.items())
        resumed = (f"; resumed: {self.resumed_shards} shards and {self.resumed_parameters} parameters were done"
                   if self.resumed_shards or self.resumed_parameters else "")
        return (f"converted {self.source} ({self.source_bytes / 1e9:.2f} GB, {self.shards} optimizer shards, "
                f"{self.parameters} parameters) to {self.output} in {self.total_seconds:.1f} s ({rate:.3f} GB/s) "
                f"with {self.workers} extract / {self.merge_workers} merge worker(s): {phases}{resumed}")


@dataclass
class _Plan:
    """What the source holds, read from its engine-state files."""

    tp: int
    pp: int
    dp: int
    shard_files: dict[tuple[int, int, int], Path]  # (pp, tp, dp) -> optimizer shard
    slice_shapes: dict[str, list]  # parameter -> its shape on each TP rank
    uc_info: dict[str, Any]
    engine_files: list[Path]


# -- the conversion ----------------------------------------------------------------------------


def convert_to_universal(checkpoint_dir: Path, output_dir: Path, pipelined_target: Optional[bool] = None,
                         num_layers: Optional[int] = None, workers: int = 1, progress: bool = False,
                         universal_info: Optional[dict[str, Any]] = None,
                         merge_workers: Optional[int] = None) -> ConversionReport:
    """Convert ``checkpoint_dir`` (a ``global_stepN`` folder) into ``output_dir``, atomically and
    resumably (see the module docstring); parameter folders are named for a pipelined (or
    single-module) target, or as in the source when ``pipelined_target`` is None (a resuming
    job renames them for its engine, which takes seconds). ``universal_info`` is used when the checkpoint carries no
    ``universal_checkpoint_info`` (Megatron-DeepSpeed's BLOOM checkpoints predate it); by default
    BLOOM's is derived from the checkpoint. ``progress`` shows tqdm bars (on a terminal).
    ``workers`` processes extract; ``merge_workers`` (default: ``workers``) merge: a merge worker
    holds up to twice one parameter's full state (the largest: BLOOM's embedding), so a big
    model may want fewer of them, as DeepSpeed's converter advises.
    """
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    source_files = sorted(p for p in checkpoint_dir.iterdir() if p.is_file())
    report = ConversionReport(checkpoint_dir, output_dir, sum(p.stat().st_size for p in source_files),
                              workers=max(1, workers), merge_workers=max(1, merge_workers or workers))
    if universal.is_complete(output_dir):
        if pipelined_target is not None:
            universal.rename_parameters(output_dir, pipelined_target, num_layers)
        report.reused = True
        return report
    timer = _PhaseTimer(report)
    with timer("scan"):
        scan_files(p for p in source_files if p.suffix == ".pt")
        zero3 = _zero_stage(checkpoint_dir) == 3
        plan = None if zero3 else _plan(checkpoint_dir, universal_info)
    staging = output_dir.with_name(output_dir.name + STAGING_SUFFIX)
    try:
        _convert_into(staging, source_files, plan, checkpoint_dir, output_dir, pipelined_target, num_layers, report,
                      timer, workers, progress)
    except (OSError, RuntimeError) as exc:
        reason = disk_full_reason(exc, output_dir.parent)
        if reason is None:
            raise
        raise ConversionError(f"converting {checkpoint_dir} into {output_dir}: {reason}. Nothing was published; the "
                              f"finished parts are kept in {staging}: free space (the output takes about the size of "
                              "the checkpoint's optimizer states) and run the same conversion again to continue") \
            from exc
    return report


def _convert_into(staging: Path, source_files: list[Path], plan: Optional["_Plan"], checkpoint_dir: Path,
                  output_dir: Path, pipelined_target: Optional[bool], num_layers: Optional[int],
                  report: "ConversionReport", timer: "_PhaseTimer", workers: int, progress: bool) -> None:
    """The phases after the scan: stage, extract, merge, finish, commit (see the module docstring)."""
    _prepare_staging(staging, source_files)
    if plan is None:
        with timer("deepspeed"):
            _convert_with_deepspeed(checkpoint_dir, staging, workers)
    else:
        report.shards, report.parameters = len(plan.shard_files), len(plan.slice_shapes)
        # Starting a worker costs seconds (it imports torch and DeepSpeed): not worth it for a small
        # checkpoint.
        if report.source_bytes < MIN_BYTES_FOR_WORKERS:
            report.workers = report.merge_workers = 1
        with timer("extract"), _pool(report.workers) as pool:
            report.resumed_shards = _extract(plan, staging, pool, progress)
        with timer("merge"), _pool(report.merge_workers) as pool:
            report.resumed_parameters, unmatched = _merge(plan, staging, pool, progress)
        if unmatched:
            raise ConversionError(f"{checkpoint_dir}: universal_checkpoint_info patterns {sorted(unmatched)} match no "
                                  "parameter: the checkpoint's patterns do not describe this model")
        with timer("finish"):
            _finish(plan, checkpoint_dir, staging)
    with timer("commit"):
        _commit(staging, output_dir, checkpoint_dir, pipelined_target, num_layers, report)


def _plan(checkpoint_dir: Path, universal_info: Optional[dict[str, Any]]) -> _Plan:
    from deepspeed.checkpoint.constants import PARAM_SHAPES, UNIVERSAL_CHECKPOINT_INFO
    from deepspeed.checkpoint.ds_to_universal import _group_per_tp_shapes

    shards = optimizer_files(checkpoint_dir)
    if not shards:
        raise ConversionError(f"{checkpoint_dir} holds no *_optim_states.pt files: there is no optimizer state to "
                              "convert (a layer-files-only checkpoint loads on any layout without conversion)")
    mp_size = 1 + max(m for _, m in shards)
    dp = 1 + max(d for d, _ in shards)
    engine_files = [checkpoint_dir / engine_state_file_name(m) for m in range(mp_size)]
    missing = [p.name for p in engine_files if not p.is_file()]
    missing += [f"zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt" for d in range(dp) for m in range(mp_size)
                if (d, m) not in shards]
    if missing:
        raise ConversionError(f"{checkpoint_dir} misses {missing[:6]}: copy the whole checkpoint")
    shapes_by_mp, uc_info, tp, pp = [], None, None, None
    for index, path in enumerate(engine_files):
        state = safe_load(path)
        groups = state.get(PARAM_SHAPES) or []
        shapes_by_mp.append({name: shape for group in groups for name, shape in group.items()})
        if index == 0:
            uc_info = state.get(UNIVERSAL_CHECKPOINT_INFO)
            dims = state.get("checkpoint_parallel_dimensions") or {}
            args = state.get("args")
            tp = dims.get("tp_degree") or getattr(args, "tensor_model_parallel_size", None)
            pp = dims.get("pp_degree") or getattr(args, "pipeline_model_parallel_size", None)
    tp = int(tp or 1)
    pp = int(pp or mp_size // tp)
    if tp * pp != mp_size:
        raise ConversionError(f"{checkpoint_dir}: {mp_size} model-parallel ranks do not make TP{tp} x PP{pp}")
    slice_shapes = _group_per_tp_shapes(shapes_by_mp, pp, tp)
    if uc_info is None:
        uc_info = universal_info or _bloom_universal_info(slice_shapes)
    shard_files = {(m // tp, m % tp, d): path for (d, m), path in shards.items()}
    return _Plan(tp, pp, dp, shard_files, slice_shapes, uc_info, engine_files)


def _bloom_universal_info(slice_shapes: dict[str, list]) -> dict[str, Any]:
    """BLOOM's patterns for a checkpoint that carries none, from its parameter names and shapes."""
    vocabulary = [shapes for name, shapes in slice_shapes.items() if name.endswith(VOCABULARY_KEY)]
    if not vocabulary:
        raise ConversionError(f"no parameter ends in {VOCABULARY_KEY}: this is not a BLOOM checkpoint, and it has no "
                              "universal_checkpoint_info describing how to merge its tensor-parallel shards")
    padded = sum(int(shape[0]) for shape in vocabulary[0])
    embed_layernorm = any(name.endswith("word_embeddings.norm.weight") for name in slice_shapes)
    return universal.universal_checkpoint_info_for(embed_layernorm, padded)


def _zero_stage(checkpoint_dir: Path) -> int:
    """The ZeRO stage the optimizer shards were written with (ZeRO-3 files have no mp_rank_* engine
    files, so this is read before anything else)."""
    shards = optimizer_files(checkpoint_dir)
    if not shards:
        return 0  # _plan explains what is missing
    optimizer = safe_load(shards[min(shards)])["optimizer_state_dict"]
    stage = optimizer.get("zero_stage", 1)
    return int(getattr(stage, "value", stage))


def _prepare_staging(staging: Path, source_files: list[Path]) -> None:
    """Keep an interrupted conversion's staging folder when it was converting the same files."""
    fingerprint = {p.name: p.stat().st_size for p in source_files}
    record = staging / _PROGRESS / "source.json"
    if staging.exists():
        try:
            same = json.loads(record.read_text()) == fingerprint
        except (OSError, ValueError):
            same = False
        if same:
            return
        shutil.rmtree(staging)
    (staging / _PROGRESS / "extract").mkdir(parents=True)
    (staging / _PROGRESS / "merge").mkdir(parents=True)
    atomic_write_text(record, json.dumps(fingerprint))


# -- phase 1: extract ----------------------------------------------------------------------------


def _extract(plan: _Plan, staging: Path, pool: Optional[ProcessPoolExecutor], progress: bool) -> int:
    done_dir = staging / _PROGRESS / "extract"
    tasks = []
    for (pp, tp, dp), path in sorted(plan.shard_files.items()):
        marker = done_dir / f"pp{pp}-tp{tp}-dp{dp}"
        if not marker.exists():
            skip = plan.uc_info.get("pipeline_replicated_parameter_patterns", []) if pp > 0 else []
            tasks.append((str(path), str(staging / _FRAGMENTS), tp, dp, skip, str(marker)))
    _run(extract_shard, tasks, pool, progress, "extract")
    return len(plan.shard_files) - len(tasks)


def extract_shard(path: str, fragments_dir: str, tp: int, dp: int, skip_patterns: list[str], marker: str) -> None:
    """Write every parameter's fragment of optimizer shard ``path`` (DeepSpeed's
    ``tmp/<param>/<tp>/<state>.<dp>`` files), holding one fragment in memory at a time."""
    from deepspeed.checkpoint.constants import (
        BASE_OPTIMIZER_STATE,
        OPTIMIZER_STATE_DICT,
        PARAM_SLICE_MAPPINGS,
        SINGLE_PARTITION_OF_FP32_GROUPS,
    )

    optimizer = safe_load(path, mmap=True)[OPTIMIZER_STATE_DICT]
    states = optimizer[BASE_OPTIMIZER_STATE]["state"]
    fp32_groups = optimizer[SINGLE_PARTITION_OF_FP32_GROUPS]
    for group, mappings in enumerate(optimizer[PARAM_SLICE_MAPPINGS]):
        flat = {"fp32": fp32_groups[group], "exp_avg": states[group]["exp_avg"],
                "exp_avg_sq": states[group]["exp_avg_sq"]}
        step = states[group].get("step")
        for name, fragment in mappings.items():
            if any(re.match(pattern, name) for pattern in skip_patterns):
                continue  # the tied embedding's copy on a later pipeline stage
            directory = Path(fragments_dir) / name / str(tp)
            directory.mkdir(parents=True, exist_ok=True)
            for state, tensor in flat.items():
                piece = tensor.narrow(0, fragment.start, fragment.numel)
                torch.save(piece.clone(), directory / f"{state}.{dp:02d}")
                _drop_pages(piece)
            if step is not None:
                torch.save(step, directory / f"step.{dp:02d}")
    Path(marker).touch()


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _drop_pages(tensor: torch.Tensor) -> None:
    """Release the memory-mapped pages behind ``tensor`` (read-only file data, read again from
    the file if touched later), so a worker's resident memory stays one fragment, not the shard."""
    if tensor.numel() == 0 or os.name != "posix":
        return
    page = mmap.PAGESIZE
    start = tensor.data_ptr() // page * page
    end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED


# -- phase 2: merge ------------------------------------------------------------------------------


def _merge(plan: _Plan, staging: Path, pool: Optional[ProcessPoolExecutor], progress: bool) -> tuple[int, set[str]]:
    done_dir = staging / _PROGRESS / "merge"
    tasks, unmatched_sets = [], []
    for name, shapes in sorted(plan.slice_shapes.items()):
        marker = done_dir / f"{name}.json"
        if marker.exists():
            unmatched_sets.append(set(json.loads(marker.read_text())))
            continue
        shapes = [list(s) if s is not None else None for s in shapes]
        tasks.append((plan.uc_info, str(staging / "zero"), str(staging / _FRAGMENTS), plan.tp, name, shapes,
                      str(marker)))
    unmatched_sets += [set(result) for result in _run(merge_parameter, tasks, pool, progress, "merge")]
    unmatched = set.intersection(*unmatched_sets) if unmatched_sets else set()
    return len(plan.slice_shapes) - len(tasks), unmatched


def merge_parameter(uc_info: dict[str, Any], zero_dir: str, fragments_dir: str, tp: int, name: str,
                    shapes: list, marker: str) -> list[str]:
    """Merge parameter ``name``'s fragments with DeepSpeed's ``merge_tp_slices`` (one state at a
    time), delete its fragments, and record it done; returns the patterns it did not use."""
    from deepspeed.checkpoint.ds_to_universal import merge_tp_slices

    shapes = [torch.Size(s) if s is not None else None for s in shapes]
    with contextlib.redirect_stdout(io.StringIO()):
        unmatched = merge_tp_slices(uc_info, zero_dir, fragments_dir, tp, (name, shapes))
    shutil.rmtree(Path(fragments_dir) / name, ignore_errors=True)  # disk back as the merge goes
    atomic_write_text(marker, json.dumps(sorted(unmatched)))
    return sorted(unmatched)


# -- phase 3: finish and commit --------------------------------------------------------------------


def _finish(plan: _Plan, checkpoint_dir: Path, staging: Path) -> None:
    from deepspeed.checkpoint.constants import (
        BASE_OPTIMIZER_STATE,
        OPTIMIZER_STATE_DICT,
        PARAM,
        PARAM_GROUPS,
        PARAM_SLICE_MAPPINGS,
        SINGLE_PARTITION_OF_FP32_GROUPS,
    )

    zero = staging / "zero"
    zero.mkdir(exist_ok=True)
    # Parameters that never had a gradient have no optimizer state: their weights come from the module.
    for path in plan.engine_files:
        module = safe_load(path).get("module")
        for name, tensor in (module or {}).items():
            fp32 = zero / name / "fp32.pt"
            if not fp32.is_file():
                fp32.parent.mkdir(parents=True, exist_ok=True)
                torch.save({PARAM: tensor.float()}, fp32)
    optimizer = safe_load(plan.shard_files[(0, 0, 0)])[OPTIMIZER_STATE_DICT]
    sharded = (BASE_OPTIMIZER_STATE, PARAM_SLICE_MAPPINGS, SINGLE_PARTITION_OF_FP32_GROUPS)
    common = {key: value for key, value in optimizer.items() if key not in sharded}
    common[PARAM_GROUPS] = optimizer[BASE_OPTIMIZER_STATE][PARAM_GROUPS]
    torch.save(common, zero / "optimizer_state.pt")
    for path in plan.engine_files:
        shutil.copy2(path, staging / path.name)
    shutil.rmtree(staging / _FRAGMENTS, ignore_errors=True)


def _convert_with_deepspeed(checkpoint_dir: Path, staging: Path, workers: int) -> None:
    """ZeRO-3: DeepSpeed's converter (whole shards in memory; ZeRO-3 runs have no pipeline here)."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(checkpoint_dir), output_folder=str(staging),
                              num_extract_workers=workers, num_merge_workers=workers, keep_temp_folder=False,
                              strict=True, inject_missing_state=False)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            ds_to_universal.main(args)
    except Exception as exc:
        raise ConversionError(f"converting {checkpoint_dir} to a universal checkpoint failed ({exc!r}); DeepSpeed's "
                              f"output was:\n{log.getvalue()[-2000:]}") from exc


def _commit(staging: Path, output_dir: Path, checkpoint_dir: Path, pipelined_target: Optional[bool],
            num_layers: Optional[int], report: ConversionReport) -> None:
    shutil.rmtree(staging / _PROGRESS, ignore_errors=True)
    names = [p.name for p in (staging / "zero").iterdir() if p.is_dir()]
    naming = "pipeline" if any(is_pipeline_name(n) for n in names) else "flat"
    marker = {"source": checkpoint_dir.name, "naming": naming, "seconds": report.seconds,
              "source_bytes": report.source_bytes}
    (staging / universal.UNIVERSAL_MARKER).write_text(json.dumps(marker) + "\n")
    if pipelined_target is not None:
        universal.rename_parameters(staging, pipelined_target, num_layers)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    fsync_tree(staging)
    os.rename(staging, output_dir)
    fsync_path(output_dir.parent)
    # DeepSpeed's own converter points ``latest_universal`` at its output; do the same.
    atomic_write_text(output_dir.parent / LATEST_UNIVERSAL_FILE, output_dir.name)


# -- helpers ---------------------------------------------------------------------------------------


class _PhaseTimer:
    def __init__(self, report: ConversionReport):
        self.report = report

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.report.seconds[phase] = round(self.report.seconds.get(phase, 0.0) + time.perf_counter() - start, 3)
        logger.info("universal conversion: %s took %.1f s", phase, self.report.seconds[phase])


@contextlib.contextmanager
def _pool(workers: int):
    """``workers`` spawned processes (spawn: safe to start from a training process with
    communication threads), or None to work in this process."""
    if workers <= 1:
        yield None
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        yield pool


def _run(fn: Callable[..., Any], tasks: list[tuple], pool: Optional[ProcessPoolExecutor], progress: bool,
         phase: str) -> list[Any]:
    """``fn(*task)`` for every task, in ``pool`` (or here), with a tqdm bar when ``progress``."""
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc=phase, unit="task", disable=not progress)
    results = []
    try:
        if pool is None:
            for task in tasks:
                results.append(fn(*task))
                bar.update()
            return results
        for future in as_completed([pool.submit(fn, *task) for task in tasks]):
            results.append(future.result())
            bar.update()
        return results
    finally:
        bar.close()


def offline_command(checkpoint_dir: Path, output_dir: Path, workers: int) -> str:
    """The ``tools/convert_checkpoint.py`` command that does the same conversion outside the job
    (the job then only renames parameter folders for its engine)."""
    return f"python tools/convert_checkpoint.py {checkpoint_dir} --output {output_dir} --workers {workers}"

