"""Assembling a run from its config: ``pretrain(cfg)`` sets up the processes, logging, seeds,
data, model and engine (resuming from the newest checkpoint), then hands them to the
:class:`~megatron.training.trainer.Trainer`, whose loop trains.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from megatron.checkpoint.checkpointing import Checkpointer
from megatron.checkpoint.layer_files import is_layer_files_only, load_layer_files_into, resolve_checkpoint_dir
from megatron.checkpoint.lock import CheckpointLock
from megatron.checkpoint.store import CheckpointStore
from megatron.config import Config, ConfigError, LoggingConfig, save_config
from megatron.core.distributed import DistributedInfo, init_distributed, on_rank0, shutdown_distributed
from megatron.core.parallel_state import ParallelState
from megatron.core.tensor_parallel import MODEL_PARALLEL_RNG, RNGStatesTracker, model_parallel_seed
from megatron.core.watchdog import Identity, Progress, Watchdog
from megatron.errors import ConversionError
from megatron.model.bloom import build_model
from megatron.model.kernels import select_adam, select_kernels
from megatron.model.pipeline import build_pipeline_model
from megatron.training.data import build_training_data
from megatron.training.engine import build_engine
from megatron.training.environment import describe_environment, write_environment
from megatron.training.lifecycle import RunLifecycle, job_start_time
from megatron.training.logging import MetricsLogger, WandbSettings
from megatron.training.precision import announce, resolve_precision
from megatron.training.schedules import BatchSizeRampup
from megatron.training.trainer import Trainer, TrainState


def pretrain(cfg: Config, on_finish: Optional[Callable[[Any, ParallelState], None]] = None) -> TrainState:
    """Build the run from its config and train it; ``on_finish(engine, parallel)`` runs on every
    rank after training, before the process group is torn down (tests use it to gather weights).

    Resumes from the newest complete checkpoint under ``checkpoint.load`` (converting it when it
    was saved on another layout). Returns normally, also when a signal, the kill switch or a
    time limit stopped the run early (after saving).
    """
    lifecycle = RunLifecycle(cfg.training, job_start_time())
    # Handle SIGTERM/SIGUSR1 from the start: one arriving during start-up stops the run before
    # its first step instead of killing it.
    with lifecycle.handling_signals():
        return _pretrain(cfg, lifecycle, on_finish)


def _pretrain(cfg: Config, lifecycle: RunLifecycle, on_finish) -> TrainState:
    info = init_distributed(cfg.parallel.distributed_timeout_minutes)
    cfg.validate(info.world_size)
    configure_logging(info.rank, cfg.logging)
    # One run per checkpoint directory, checked before any work (megatron/checkpoint/lock.py).
    lock = CheckpointLock(cfg.checkpoint.save) if cfg.checkpoint.save and info.rank == 0 else None
    try:
        if cfg.checkpoint.save:
            on_rank0(lambda: lock.acquire(), f"lock checkpoint directory {cfg.checkpoint.save}")
        return _train(cfg, lifecycle, on_finish, info)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Config, lifecycle: RunLifecycle, on_finish, info) -> TrainState:
    cfg, precision = resolve_precision(cfg, info.device)
    announce(precision, info.rank)
    p = cfg.parallel
    parallel = ParallelState(info.world_size, info.rank, p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
    progress = Progress(info.rank)
    with watching(progress, info, parallel, p.distributed_timeout_minutes):
        return _run(cfg, info, parallel, precision, lifecycle, progress, on_finish)


def watching(progress: Progress, info: DistributedInfo, parallel: ParallelState,
             timeout_minutes: float) -> contextlib.AbstractContextManager:
    """The watchdog of this rank (megatron/core/watchdog.py) while the block runs; none in a world
    of one, where no rank waits for another (and a long phase has no process-group timeout)."""
    if info.world_size == 1:
        return contextlib.nullcontext()
    identity = Identity.of_this_process(info.rank, info.world_size, parallel.tp_rank, parallel.pp_rank,
                                        parallel.dp_rank)
    return Watchdog(progress, identity, timeout_minutes * 60)


def _run(cfg: Config, info: DistributedInfo, parallel: ParallelState, precision, lifecycle: RunLifecycle,
         progress: Progress, on_finish) -> TrainState:
    p = cfg.parallel
    # Megatron's seeds: the default stream differs per pipeline stage (different layers), not per
    # TP rank (duplicated activations must draw equal masks); the tracker's differs per TP rank.
    set_seed(model_parallel_seed(cfg.training.seed, parallel.tp_rank, parallel.pp_rank)[0])
    tracker = build_rng_tracker(cfg, parallel, info.device)
    # Rank 0 tries every output directory now, not at the first save hours later; a failure
    # reaches every rank, so the job ends with one message instead of ranks stuck in a collective.
    # An evaluation-only run writes nothing there, and leaves the run's own config.yaml and
    # environment record as training wrote them.
    if not cfg.training.eval_only:
        on_rank0(lambda: check_output_directories(cfg), "check the output directories")
    if info.rank == 0 and cfg.logging.run_dir and not cfg.training.eval_only:
        save_config(cfg, Path(cfg.logging.run_dir) / "config.yaml")
        layout = {"tp": parallel.tp_size, "pp": parallel.pp_size, "dp": parallel.dp_size, "zero_stage": p.zero_stage}
        write_environment(cfg.logging.run_dir, describe_environment(
            cfg, info.world_size, layout, info.device, precision.name, precision.reason))
    progress.mark("building the datasets", watched=False)
    data = build_training_data(cfg, parallel)
    progress.mark("building the model", watched=False)
    model = build_network(cfg, parallel, info.device, tracker)
    rampup = BatchSizeRampup.from_config(cfg.training)
    checkpointer = Checkpointer(cfg, parallel, tracker)
    weights_only = initial_weights(cfg)
    if weights_only is not None:
        # An HF import or a published BLOOM checkpoint: weights (resharded to this TP size) and a
        # fresh optimizer, from iteration 0. Loaded before DeepSpeed copies the master weights.
        load_layer_files_into(model, weights_only, parallel, cfg.model.num_layers)
        logging.getLogger(__name__).info("initialised the weights from %s (fresh optimizer)", weights_only)
    # With a pipeline DeepSpeed builds its grid from the PipelineModule's topology and refuses an mpu.
    engine_for = functools.partial(build_engine, cfg, model, parallel.dp_size, rampup(0),
                                   mpu=None if parallel.pp_enabled else parallel)
    progress.mark("building the engine and loading the checkpoint", watched=False)
    resumed = checkpointer.resume(engine_for, search=weights_only is None)
    logger = MetricsLogger(cfg.logging.run_dir, cfg.logging.tensorboard_dir, info.rank, WandbSettings.from_config(cfg))
    try:
        trainer = Trainer(cfg, info, parallel, resumed, data, logger, checkpointer, lifecycle, progress)
        state = trainer.train()
        if on_finish is not None:
            on_finish(resumed.engine, parallel)
    finally:
        logger.close()
        progress.mark("shutdown")
        shutdown_distributed()
    return state


def check_output_directories(cfg: Config) -> None:
    """Create ``logging.run_dir``, ``logging.tensorboard_dir`` and ``checkpoint.save`` if needed and
    write (then remove) a probe file in each; raises ConfigError naming the field when one cannot
    be written (read-only mount, permissions, a file in the way). Nothing already there is touched."""
    for field, value in (("logging.run_dir", cfg.logging.run_dir),
                         ("logging.tensorboard_dir", cfg.logging.tensorboard_dir),
                         ("checkpoint.save", cfg.checkpoint.save)):
        if not value:
            continue
        try:
            Path(value).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=value, prefix=".write-probe-"):
                pass
        except OSError as exc:
            raise ConfigError(f"{field} {value} is not writable ({exc.strerror or exc}): choose a directory this "
                              "job can write, or make it writable (remount a read-only mount read-write)") from None


def configure_logging(rank: int, log_cfg: LoggingConfig) -> None:
    """Show the ``megatron`` loggers' messages on the console: rank 0's at ``logging.log_level``,
    every rank's warnings; DeepSpeed's at ``logging.deepspeed_log_level`` (its info level reports
    memory and process groups at every engine build, noise for most runs). A configuration made
    by the caller is left alone, apart from DeepSpeed's level."""
    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.setLevel(log_cfg.deepspeed_log_level.upper())
    log = logging.getLogger("megatron")
    if log.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[%(asctime)s rank {rank}] %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(log_cfg.log_level.upper() if rank == 0 else logging.WARNING)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch so a run is reproducible bit for bit on CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_rng_tracker(cfg: Config, parallel: ParallelState, device: torch.device) -> RNGStatesTracker:
    """The tensor-parallel random stream of this rank (Megatron's seeds); saved in checkpoints."""
    tracker = RNGStatesTracker(device)
    tracker.add(MODEL_PARALLEL_RNG, model_parallel_seed(cfg.training.seed, parallel.tp_rank, parallel.pp_rank)[1])
    return tracker


def build_network(cfg: Config, parallel: ParallelState, device: torch.device,
                  rng_tracker: Optional[RNGStatesTracker] = None) -> torch.nn.Module:
    """The model for this rank: a PipelineModule when PP > 1, else the TP-aware BLOOM; dropout
    draws from ``rng_tracker`` where activations differ across TP ranks."""
    t, p = cfg.training, cfg.parallel
    dtype = torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else torch.float32
    kernels = select_kernels(cfg.model, torch.device(device).type, dtype)
    if parallel.rank == 0:
        adam = select_adam(cfg.optimizer, torch.device(device).type)
        logging.getLogger(__name__).info("%s, adamw=%s (%s)", kernels.describe(), adam.name, adam.reason)
    if parallel.pp_enabled:
        return build_pipeline_model(cfg, parallel, cfg.training.seed, rng_tracker, kernels).to(device)
    return build_model(cfg.model, cfg.padded_vocab_size, device=device,
                       tp_group=parallel.tp_group_or_none,
                       sequence_parallel=p.sequence_parallel, seed=t.seed,
                       checkpoint_num_layers=t.checkpoint_num_layers if t.checkpoint_activations else 0,
                       rng_tracker=rng_tracker, kernels=kernels)


def initial_weights(cfg: Config) -> Optional[Path]:
    """The module-only checkpoint (layer files without engine state) that ``checkpoint.load``
    holds, when it holds no complete checkpoint of ours to resume from; else None."""
    directory = cfg.checkpoint.load
    if not directory or not Path(directory).is_dir():
        return None
    complete, _ = CheckpointStore(directory).find_newest_complete()
    if complete is not None:
        return None
    try:
        candidate = resolve_checkpoint_dir(directory)
    except ConversionError:
        return None
    return candidate if is_layer_files_only(candidate) else None
