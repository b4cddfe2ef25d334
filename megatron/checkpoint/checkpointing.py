"""Saving and resuming a run: one :class:`Checkpointer` per process, every method collective.

Save (``Checkpointer.save``)::

    engine.save_checkpoint(save, tag="global_stepN.tmp-<id>", save_latest=False)
        model files (PipelineModule: layer_XX-model_YY; plain engine: mp_rank_XX + ours below),
        ZeRO optimizer shards, and our client state in every mp_rank_XX_model_states.pt
    PP = 1: layer_XX-model_YY-model_states.pt written from the module's state dict
    barrier; rank 0 commits (megatron/checkpoint/store.py): fsync, manifest, rename, latest;
    rank 0 applies retention (checkpoint.keep_last / keep_every)

The client state holds everything the loop needs to continue exactly: the iteration,
consumed samples and tokens (which fix the data position, the learning rate and the ramped
batch size, all functions of consumed data), the current learning rate and batch size (for
checking), the config, every random stream of every rank (megatron/checkpoint/rng.py), and
``universal_checkpoint_info`` for resharding.

Resume (``Checkpointer.resume``, one call that builds the engine): rank 0 picks the newest
checkpoint whose manifest checks out, reporting and skipping newer broken ones; when it was
saved on another TP / PP / DP layout (or precision), rank 0 converts it once to a universal
checkpoint next to it (``global_stepN_universal``) and the engine is built with
``load_universal``; then every rank loads through ``engine.load_checkpoint``. The random
streams are put back later (``restore_rng``), once the loop has created its data iterators.

Checkpoints written by Megatron-DeepSpeed itself (BLOOM's; no manifest) resume too, on their
own layout or through the universal conversion (megatron/checkpoint/megatron_deepspeed.py).

What gets unpickled: DeepSpeed's ``load_checkpoint`` reads the ``.pt`` files with
``torch.load(weights_only=False)`` (they hold optimizer objects, Megatron-DeepSpeed's
``argparse.Namespace``, NumPy random states). Before that, finding the checkpoint scans every
file's pickle against an allow-list (megatron/checkpoint/pickle_scan.py) and refuses anything
else; our converter reads the files with the restricted unpickler only.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch.distributed as dist

from megatron.checkpoint import megatron_deepspeed, universal
from megatron.checkpoint.layer_files import save_layer_files
from megatron.checkpoint.layout import UNIVERSAL_FAILED_SUFFIX, checkpoint_tag, universal_tag
from megatron.checkpoint.rng import capture_rng_state, gather_data_parallel, reseed, restore_rng_state
from megatron.checkpoint.store import CheckpointInfo, CheckpointStore, new_temporary_tag
from megatron.checkpoint.universal_conversion import convert_to_universal, offline_command
from megatron.config import Config
from megatron.core.distributed import on_rank0
from megatron.core.parallel_state import ParallelState
from megatron.errors import CheckpointError, ProjectError
from megatron.utils.atomic import atomic_write_text, disk_full_reason

if TYPE_CHECKING:  # deepspeed is imported where an engine is built, not when this module loads
    from deepspeed.runtime.engine import DeepSpeedEngine

logger = logging.getLogger(__name__)

# Megatron's checkpoint_version 3.0: fused QKV rows ordered [head, (q, k, v), head_dim], as ours.
MEGATRON_CHECKPOINT_VERSION = 3.0
# Model fields a checkpoint must share with the config that resumes it.
_MODEL_SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size",
                       "embed_layernorm")


@dataclass
class ResumePoint:
    """The checkpoint a run resumes from, and how."""

    directory: Path
    tag: str
    iteration: int
    saved_layout: dict[str, Any]
    universal: bool  # saved on another layout: load the universal conversion

    @property
    def load_tag(self) -> str:
        """The folder under ``directory`` the engine loads."""
        return universal_tag(self.tag) if self.universal else self.tag


@dataclass
class LoadedCheckpoint:
    """What a resumed run continues from (the engine's own state is loaded in place)."""

    tag: str
    train_state: dict[str, Any]
    rng_state: Optional[dict[str, Any]]  # this rank's streams; None when the layout changed
    schedule: dict[str, Any]  # the next step's learning rate and batch size, as the saving run had them


@dataclass
class Resumed:
    """What :meth:`Checkpointer.resume` gives a run to start from."""

    engine: DeepSpeedEngine
    checkpoint: Optional[LoadedCheckpoint]  # None: iteration 0, the weights the model was built with


class Checkpointer:
    """Saves and resumes one run; every method must be called on every rank."""

    def __init__(self, cfg: Config, parallel: ParallelState, rng_tracker=None):
        self.cfg = cfg
        self.parallel = parallel
        self.rank = parallel.rank
        self.rng_tracker = rng_tracker

    # -- layout -------------------------------------------------------------------------------

    def layout(self) -> dict[str, Any]:
        """The running layout and precision, as recorded in manifests."""
        parallel, t = self.parallel, self.cfg.training
        return {"tensor_model_parallel_size": parallel.tp_size, "pipeline_model_parallel_size": parallel.pp_size,
                "data_parallel_size": parallel.dp_size, "world_size": parallel.layout.world_size,
                "zero_stage": self.cfg.parallel.zero_stage, "bf16": t.bf16, "fp16": t.fp16}

    def _needs_universal(self, saved: dict[str, Any]) -> bool:
        mine = self.layout()
        # Parameter names differ between a pipeline and a single module (Megatron-DeepSpeed runs
        # BLOOM as a pipeline also at PP = 1): DeepSpeed then cannot load the files as they are.
        saved_pipelined = saved.get("pipelined", saved.get("pipeline_model_parallel_size", 1) > 1)
        return (saved_pipelined != self.parallel.pp_enabled
                or any(saved.get(key) != mine[key] for key in mine if key != "world_size"))

    # -- saving -------------------------------------------------------------------------------

    def save(self, engine: DeepSpeedEngine, train_state: dict[str, Any], schedule: dict[str, Any]) -> None:
        """Write checkpoint ``global_step{iteration}`` atomically (see the module docstring).

        Raises :class:`CheckpointSaveFailed` on every rank when the disk filled up (ENOSPC,
        EDQUOT, or EFBIG from a file-size limit) on any rank: the partial checkpoint is removed,
        the previous ones are untouched, and the message names the directory and the bytes needed.
        """
        directory = self.cfg.checkpoint.save
        if not directory:
            raise CheckpointError("checkpoint.save is not set: set it to a directory to save checkpoints")
        start = time.perf_counter()
        tag = checkpoint_tag(train_state["iteration"])
        store = CheckpointStore(directory)

        def prepare_directory() -> str:
            Path(directory).mkdir(parents=True, exist_ok=True)
            temporary = new_temporary_tag(tag)
            for path in store.remove_leftovers():
                logger.warning("removed %s, left by an interrupted save or deletion", path)
            return temporary

        temporary = on_rank0(prepare_directory, f"prepare checkpoint directory {directory}")
        client_state = self._client_state(train_state, schedule)
        failure = None
        try:
            engine.save_checkpoint(directory, tag=temporary, client_state=client_state, save_latest=False)
            if not self.parallel.pp_enabled:
                self._write_layer_files(engine, Path(directory) / temporary)
        except Exception as exc:  # noqa: BLE001 - only a full disk is handled; the rest is re-raised below
            failure = disk_full_reason(exc, directory)
            if failure is None:
                raise
        # Every rank learns whether any rank ran out of space (also the barrier before the commit:
        # every rank's files are on disk before rank 0 commits).
        failure = _first_failure(failure)

        def commit() -> CheckpointInfo | str:
            if failure is not None:
                return self._discard(store, temporary, tag, failure)
            metadata = {"layout": self.layout(), "train_state": dict(train_state), "schedule": dict(schedule),
                        "config": self.cfg.to_dict(), "padded_vocab_size": self.cfg.padded_vocab_size,
                        "write_seconds": round(time.perf_counter() - start, 3)}
            try:
                info = store.commit(temporary, tag, metadata)
            except OSError as exc:  # the manifest itself, or ``latest``, did not fit
                reason = disk_full_reason(exc, directory)
                if reason is None:
                    raise
                return self._discard(store, temporary, tag, reason)
            for deleted in store.apply_retention(self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every):
                logger.info("deleted checkpoint %s/%s (checkpoint.keep_last=%s, keep_every=%s)", directory, deleted,
                            self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every)
            return info

        info = on_rank0(commit, f"commit checkpoint {directory}/{tag}")
        if isinstance(info, str):
            raise CheckpointSaveFailed(info)
        if self.rank == 0:
            size = sum(info.manifest["files"].values())
            logger.info("saved checkpoint %s (%d files, %.1f MB) in %.2f s", info.path, len(info.manifest["files"]),
                        size / 1e6, time.perf_counter() - start)

    def _discard(self, store: CheckpointStore, temporary: str, tag: str, reason: str) -> str:
        """Remove the partial ``temporary`` checkpoint after a full disk; the message for the user."""
        staging = store.directory / temporary
        written = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file()) if staging.is_dir() else 0
        store.discard(temporary)
        newest, _ = store.find_newest_complete()
        free = shutil.disk_usage(store.directory).free
        if newest is not None:
            needed = sum(newest.manifest["files"].values())
            kept = f"the newest complete checkpoint, {newest.path}, is intact"
            size = f"a checkpoint of this run takes about {needed:,} bytes"
        else:
            kept = "there is no earlier complete checkpoint"
            size = f"more than the {written:,} bytes written before the failure are needed"
        return (f"saving checkpoint {store.directory / tag} failed: {reason}. {size}; {free:,} bytes are free in "
                f"{store.directory}. The partial checkpoint was removed and {kept}. Free space (or raise the file-"
                "size limit, ulimit -f), or set checkpoint.save elsewhere; with checkpoint.on_save_failure: continue "
                "the run keeps training and tries again at the next save_interval")

    def _client_state(self, train_state: dict[str, Any], schedule: dict[str, Any]) -> dict[str, Any]:
        rng = gather_data_parallel(capture_rng_state(self.rng_tracker), self.parallel.dp_group, self.parallel.dp_size)
        return {
            # Megatron-DeepSpeed's keys, read by its tools and by ds_to_universal.
            "iteration": train_state["iteration"],
            "tokens": train_state.get("consumed_tokens", 0),
            "checkpoint_version": MEGATRON_CHECKPOINT_VERSION,
            "rng_state": rng,
            "universal_checkpoint_info": universal.universal_checkpoint_info(self.cfg),
            # Ours.
            "train_state": dict(train_state),
            "schedule": dict(schedule),
            "config": self.cfg.to_dict(),
            "layout": self.layout(),
        }

    def _write_layer_files(self, engine: DeepSpeedEngine, directory: Path) -> None:
        """Without a pipeline, write the model as the pipeline's layer files (one per TP rank)."""
        module = engine.module
        gathered = contextlib.nullcontext()
        if self.cfg.parallel.zero_stage == 3:
            import deepspeed

            # ZeRO-3 holds shards of every parameter; gathering is collective over all ranks.
            gathered = deepspeed.zero.GatheredParameters(list(module.parameters()))
        with gathered:
            save_layer_files(module, directory, self.parallel, self.cfg.model.num_layers)

    # -- resuming -----------------------------------------------------------------------------

    def resume(self, build_engine: Callable[..., DeepSpeedEngine], search: bool) -> Resumed:
        """The engine this run trains, loaded from the newest complete checkpoint under
        ``checkpoint.load`` when there is one (converted first when saved on another layout).

        ``build_engine(load_universal=...)`` builds the engine: the checkpoint decides whether it
        must read a universal checkpoint, so the engine is built here, between conversion and
        load. ``search`` False: start from the model's weights as built (``checkpoint.load``
        holds initial weights only), with a fresh optimizer. Loop state comes back in
        ``Resumed.checkpoint``; the random streams with :meth:`restore_rng`, which must wait
        until the data iterators exist.
        """
        point = self.find_resume_point() if search else None
        if point is None:
            return Resumed(build_engine(load_universal=False), None)
        self._convert(point)
        engine = build_engine(load_universal=point.universal)
        return Resumed(engine, self.load(engine, point))

    def find_resume_point(self) -> Optional[ResumePoint]:
        """The newest complete checkpoint under ``checkpoint.load`` (None: there is no checkpoint,
        start from scratch). Raises when checkpoints exist but none is complete, or when the
        newest holds a different model.

        Rank 0 checks the checkpoints and logs what it skipped and what it picked; every rank
        gets the same answer.
        """
        directory = self.cfg.checkpoint.load
        if not directory:
            return None

        def find() -> Optional[ResumePoint]:
            store = CheckpointStore(directory)
            info, report = store.find_newest_complete(self.cfg.checkpoint.verify)
            for line in report:
                logger.warning(line)
            if info is None and store.tags():
                # Starting afresh would silently throw the run away (and later overwrite these).
                raise CheckpointError(f"none of the checkpoints in {directory} is complete (see the messages above): "
                                 "repair them, move them away to start from scratch, or point checkpoint.load "
                                 "elsewhere")
            if info is None:
                logger.info("no checkpoint in %s: starting from scratch", directory)
                return None
            latest = store.latest_tag()
            if latest is not None and latest != info.tag:
                logger.warning("%s/latest names %s, but the newest complete checkpoint is %s", directory, latest,
                               info.tag)
            self._check_compatible(info)
            saved = info.manifest.get("layout", {})
            resume = ResumePoint(Path(directory), info.tag, info.iteration, saved, self._needs_universal(saved))
            logger.info("resuming from checkpoint %s (iteration %d)%s", info.path, info.iteration,
                        f", saved on layout {_describe(saved)}; running {_describe(self.layout())}: converting"
                        if resume.universal else "")
            return resume

        return on_rank0(find, f"find a checkpoint to resume from in {directory}")

    def _convert(self, resume: ResumePoint) -> None:
        """Convert ``resume`` to a universal checkpoint when needed (rank 0, once; reused after).

        Rank 0 converts with the code of ``tools/convert_checkpoint.py``; the other ranks wait
        by polling for its completion marker (or a failure note), not in a collective: a
        conversion of a large model takes longer than the process group's timeout, and a timed
        out collective would kill the job. Converting ahead with the tool skips this wait.
        """
        if not resume.universal:
            return
        source, target = resume.directory / resume.tag, resume.directory / resume.load_tag
        failure = target.with_name(target.name + UNIVERSAL_FAILED_SUFFIX)
        pipelined, num_layers = self.parallel.pp_enabled, self.cfg.model.num_layers
        workers = self.cfg.checkpoint.universal_conversion_workers

        def prepare() -> None:  # quick; a collective so that no rank sees an older failure note
            failure.unlink(missing_ok=True)
            if universal.is_complete(target):
                universal.rename_parameters(target, pipelined, num_layers)
                logger.info("using the universal conversion %s", target)
            else:
                logger.info("converting %s to a universal checkpoint %s in this job; the other ranks wait for it. "
                            "To convert ahead of a job: %s", source, target,
                            offline_command(source, target, workers))

        on_rank0(prepare, f"prepare the universal conversion of {source}")
        if self.rank == 0:
            try:
                report = convert_to_universal(source, target, pipelined, num_layers, workers=workers)
            except Exception as exc:
                atomic_write_text(failure, f"{type(exc).__name__}: {exc}")
                raise
            if not report.reused:
                logger.info("%s", report.summary())
        else:
            _wait_for_conversion(target, failure, self.rank)
        if dist.is_initialized():
            dist.barrier()  # every rank has seen the marker: safe to build engines that read it

    def load(self, engine: DeepSpeedEngine, resume: ResumePoint) -> LoadedCheckpoint:
        """Load model, optimizer and loop state from ``resume`` into ``engine``.

        The engine must have been built with ``load_universal`` equal to ``resume.universal``.
        """
        start = time.perf_counter()
        path, client_state = engine.load_checkpoint(str(resume.directory), tag=resume.load_tag,
                                                    load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None or client_state is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {resume.directory / resume.load_tag}: check "
                                  "that the directory holds mp_rank_*_model_states.pt files, or move it away to start "
                                  "afresh")
        if "train_state" in client_state:
            train_state = dict(client_state["train_state"])
            rng_state = None if resume.universal else client_state["rng_state"][self.parallel.dp_rank]
        else:  # written by Megatron-DeepSpeed: its keys
            train_state = megatron_deepspeed.train_state(client_state)
            rng_state = None if resume.universal else megatron_deepspeed.rng_state(client_state, self.parallel.dp_rank)
        if self.rank == 0:
            logger.info("loaded %s in %.2f s: iteration %d, %d samples consumed", resume.directory / resume.load_tag,
                        time.perf_counter() - start, train_state["iteration"], train_state["consumed_samples"])
        return LoadedCheckpoint(resume.tag, train_state, rng_state, dict(client_state.get("schedule", {})))

    def restore_rng(self, loaded: LoadedCheckpoint) -> None:
        """Continue every random stream where the saved run was; after a layout change (no saved
        streams for these ranks) derive fresh ones from (seed, iteration) instead.

        Call it after creating the data iterators: creating one draws from torch's generator, a
        draw the uninterrupted run did not make at this point, so restoring after it drops it.
        """
        if loaded.rng_state is not None:
            restore_rng_state(loaded.rng_state, self.rng_tracker)
            return
        reseed(self.cfg.training.seed, loaded.train_state["iteration"], self.rng_tracker, self.parallel.tp_rank,
               self.parallel.pp_rank)

    def _check_compatible(self, info: CheckpointInfo) -> None:
        saved = info.manifest.get("config", {}).get("model", {})
        mine = self.cfg.to_dict()["model"]
        differing = [f"model.{key}: checkpoint {saved.get(key)!r}, config {mine[key]!r}"
                     for key in _MODEL_SHAPE_FIELDS if key in saved and saved[key] != mine[key]]
        if differing:
            raise CheckpointError(f"checkpoint {info.path} holds a different model ({'; '.join(differing)}): resume "
                                  "with the checkpoint's model settings, or set checkpoint.load to another directory")
        padded = info.manifest.get("padded_vocab_size")
        if padded is not None and padded > self.cfg.padded_vocab_size:
            raise CheckpointError(f"checkpoint {info.path} has a padded vocabulary of {padded} rows but this run pads "
                                  f"to {self.cfg.padded_vocab_size}: set model.pad_vocab_size_to: {padded}")
        saved_data = [d.get("name") for d in info.manifest.get("config", {}).get("data", {}).get("datasets", [])]
        if saved_data and saved_data != [d.name for d in self.cfg.data.datasets]:
            logger.warning("checkpoint %s was trained on datasets %s, this run uses %s: the data order after "
                           "resuming differs from the saved run's", info.path, saved_data,
                           [d.name for d in self.cfg.data.datasets])


def _wait_for_conversion(target: Path, failure: Path, rank: int, poll_seconds: float = 1.0) -> None:
    """Wait until rank 0's conversion into ``target`` completes; raise its failure note."""
    start = last_report = time.monotonic()
    while not universal.is_complete(target):
        if failure.is_file():
            raise RuntimeError(f"rank {rank}: rank 0 failed to convert to the universal checkpoint {target}: "
                               f"{failure.read_text(encoding='utf-8', errors='replace')[:2000]}")
        if time.monotonic() - last_report > 300:
            last_report = time.monotonic()
            logger.info("rank %d: waiting %.0f min for the universal conversion %s", rank,
                        (last_report - start) / 60, target)
        time.sleep(poll_seconds)


class CheckpointSaveFailed(ProjectError, RuntimeError):
    """A save ran out of disk space; the partial checkpoint is gone and the previous one intact."""


def _first_failure(failure: Optional[str]) -> Optional[str]:
    """Every rank's view of a save: None when every rank wrote its files, else a failing rank's reason."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return failure
    reasons: list[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, failure)
    return next((r for r in reasons if r is not None), None)


def _describe(layout: dict[str, Any]) -> str:
    precision = "bf16" if layout.get("bf16") else "fp16" if layout.get("fp16") else "fp32"
    return (f"TP{layout.get('tensor_model_parallel_size')} PP{layout.get('pipeline_model_parallel_size')} "
            f"DP{layout.get('data_parallel_size')} ZeRO-{layout.get('zero_stage')} {precision}")
