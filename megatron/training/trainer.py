"""The training loop. ``pretrain(cfg)`` builds everything, then ``Trainer.train()`` runs it.

One iteration: pick the batch size (ramp-up) and learning rate (schedule) from the samples
consumed so far, run the micro-batches of this data-parallel rank through the DeepSpeed engine
(which accumulates gradients and applies AdamW at the boundary), then log. Steps whose
gradients are not finite are skipped by ZeRO's optimizer; we count them and stop after too
many in a row.

After every step the run's lifecycle (megatron/training/lifecycle.py) is asked whether to stop
(signal, kill switch, time limit, exit interval); if so, the run saves and returns normally,
so the process exits with status 0 and a requeued job resumes from that checkpoint
(megatron/checkpoint). Iterations in ``training.skip_train_iteration_range`` consume their data
without a forward or backward pass.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from megatron.checkpoint.checkpointing import Checkpointer, LoadedCheckpoint
from megatron.checkpoint.store import CheckpointStore
from megatron.config import Config, LoggingConfig, save_config
from megatron.core.distributed import DistributedInfo, init_distributed, shutdown_distributed
from megatron.errors import ConversionError
from megatron.checkpoint.layer_files import is_layer_files_only, load_layer_files_into, resolve_checkpoint_dir
from megatron.core.parallel_state import ParallelState
from megatron.core.tensor_parallel import (
    MODEL_PARALLEL_RNG, RNGStatesTracker, check_tp_duplicates_in_sync, model_parallel_seed)
from megatron.model.bloom import build_model
from megatron.model.pipeline import build_pipeline_model
from megatron.training.data import TrainingData, build_training_data
from megatron.training.engine import build_engine, set_learning_rate
from megatron.training.environment import describe_environment, write_environment
from megatron.training.lifecycle import RunLifecycle, job_start_time
from megatron.training.logging import MetricsLogger, ProgressLines, console, format_train_line
from megatron.training.metrics import throughput
from megatron.training.precision import announce, resolve_precision
from megatron.training.schedules import BatchSizeRampup, LearningRateSchedule, total_train_samples
from megatron.training.steps import EngineSteps, PipelineSteps
from megatron.utils.terminal import show_progress


class TooManySkippedSteps(RuntimeError):
    """Raised when consecutive steps keep producing non-finite losses or gradients."""


@dataclass
class TrainState:
    """Progress that a checkpoint must carry to resume exactly."""

    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_iterations: int = 0  # updates skipped for non-finite loss or gradients
    consecutive_skipped: int = 0
    data_skipped_iterations: int = 0  # iterations in training.skip_train_iteration_range

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainState":
        """From a checkpoint's ``train_state``; fields unknown to this version are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch so a run is reproducible bit for bit on CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Owns the loop; every collaborator is passed in, nothing is global.

    ``resumed`` is the checkpoint the state came from: its random streams are restored once the
    data iterator exists (creating it draws from torch's generator), so the resumed run draws
    exactly what the uninterrupted run drew.
    """

    def __init__(self, cfg: Config, info: DistributedInfo, parallel: ParallelState, engine, data: TrainingData,
                 logger: MetricsLogger, state: Optional[TrainState] = None,
                 checkpointer: Optional[Checkpointer] = None, lifecycle: Optional[RunLifecycle] = None,
                 resumed: Optional[LoadedCheckpoint] = None):
        self.cfg = cfg
        self.info = info
        self.parallel = parallel
        self.engine = engine
        self.data = data
        self.logger = logger
        self.state = state or TrainState()
        self.checkpointer = checkpointer or Checkpointer(cfg, parallel)
        self.lifecycle = lifecycle or RunLifecycle(cfg.training, time.time())
        self.stop_reason: Optional[str] = None  # why the run stopped before the end, if it did
        # A resumed run need not save again before its first step (same directory only).
        same_directory = cfg.checkpoint.load == cfg.checkpoint.save
        self._saved_iteration: Optional[int] = (resumed.train_state["iteration"] if resumed and same_directory
                                                else None)
        steps = PipelineSteps if parallel.pp_enabled else EngineSteps
        self.steps = steps(engine, parallel, info.device, cfg.model.use_fused_kernels)
        self.rampup = BatchSizeRampup.from_config(cfg.training)
        self.train_samples = total_train_samples(cfg.training, self.rampup)
        self.schedule = LearningRateSchedule.from_config(cfg.optimizer, self.train_samples, cfg.model.seq_length)
        self._batches: Iterator[dict[str, torch.Tensor]] = iter(data.train_loader(self.state.consumed_samples))
        if resumed is not None:
            self._check_schedule(resumed.schedule)
            self.checkpointer.restore_rng(resumed)

    def _check_schedule(self, saved: dict[str, Any]) -> None:
        """Warn when the resumed run's next learning rate or batch size is not the saved run's
        (the schedule or ramp-up settings changed since the save; sometimes on purpose)."""
        s = self.state
        now = {"next_learning_rate": self.schedule(s.consumed_samples, s.consumed_tokens),
               "next_global_batch_size": self.rampup(s.consumed_samples)}
        changed = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v}
        if changed and self.info.rank == 0:
            console(f"warning: resuming at iteration {s.iteration} with {changed} (checkpoint, now): the "
                       "optimizer or training settings differ from the saved run's")

    # -- one step -------------------------------------------------------------------------------

    def _prepare_step(self) -> tuple[int, float]:
        batch_size = self.rampup(self.state.consumed_samples)
        if batch_size != self.engine.train_batch_size():
            self.engine.set_train_batch_size(batch_size)
        return batch_size, self.schedule(self.state.consumed_samples, self.state.consumed_tokens)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over the current global batch; returns the step's scalars."""
        batch_size, lr = self._prepare_step()
        set_learning_rate(self.engine, lr)
        skipped_before = self.engine.skipped_steps
        loss = self.steps.train(self._batches)
        skipped = self.engine.skipped_steps > skipped_before or not math.isfinite(loss)
        self._advance(batch_size, skipped)
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        return {"lm loss": loss, "learning-rate": lr, "batch-size": batch_size,
                "grad-norm": None if skipped else grad_norm, "skipped": skipped}

    def skip_step(self) -> dict[str, Any]:
        """An iteration of ``training.skip_train_iteration_range``: its micro-batches are read and
        dropped (the data position moves on as if trained), no forward, backward or update."""
        batch_size, lr = self._prepare_step()
        for _ in range(self.engine.gradient_accumulation_steps()):
            next(self._batches)
        self._advance(batch_size, skipped=False)
        self.state.data_skipped_iterations += 1
        if self.info.rank == 0:
            console(f"iteration {self.state.iteration}: skipped by training.skip_train_iteration_range "
                       f"({batch_size} samples of data consumed, no update)")
        return {"lm loss": float("nan"), "learning-rate": lr, "batch-size": batch_size, "grad-norm": None,
                "skipped": True, "data-skipped": True}

    def check_tp_duplicates(self) -> None:
        """Fail loudly when parameters duplicated across TP ranks (LayerNorms, row-parallel
        biases) differ: BLOOM-176B lost weeks to such copies drifting apart."""
        if not self.parallel.tp_enabled:
            return
        differing = check_tp_duplicates_in_sync(self.engine.module, self.parallel.tp_group)
        if differing:
            raise RuntimeError(
                f"rank {self.info.rank}: tensor-parallel duplicated parameters differ across TP ranks at iteration "
                f"{self.state.iteration}: {differing[:8]}; resume from the last checkpoint and check the "
                "gradient reduction of these parameters"
            )

    def _advance(self, batch_size: int, skipped: bool) -> None:
        s = self.state
        s.iteration += 1
        s.consumed_samples += batch_size  # data is consumed even when the update is skipped
        s.consumed_tokens += batch_size * self.cfg.model.seq_length
        if skipped:
            s.skipped_iterations += 1
            s.consecutive_skipped += 1
            limit = self.cfg.training.max_consecutive_skipped_steps
            if s.consecutive_skipped > limit:
                raise TooManySkippedSteps(
                    f"{s.consecutive_skipped} consecutive steps had a non-finite loss or gradient (limit "
                    f"training.max_consecutive_skipped_steps={limit}) at iteration {s.iteration}: lower "
                    "optimizer.lr, check the data around these samples, or resume from an earlier checkpoint "
                    "with training.skip_train_iteration_range"
                )
        else:
            s.consecutive_skipped = 0

    # -- evaluation -----------------------------------------------------------------------------

    def eval_languages(self, final: bool) -> Optional[list[str]]:
        """Languages to evaluate now (None: all): ``logging.eval_languages_per_interval`` of them,
        in turn. The turn is a function of the iteration, so a resumed run picks what the
        uninterrupted one would have."""
        n, every = self.cfg.logging.eval_languages_per_interval, self.cfg.logging.eval_interval
        languages = self.data.valid_languages
        if final or n is None or n >= len(languages) or not every:
            return None
        start = (self.state.iteration // every) * n
        return [languages[(start + i) % len(languages)] for i in range(n)]

    @torch.no_grad()
    def evaluate(self, final: bool = False) -> dict[str, float]:
        """Validation loss and perplexity, overall and per language, averaged over tokens and DP ranks
        (at ``final``, every language whatever ``logging.eval_languages_per_interval`` says)."""
        self.engine.eval()
        results = {}
        sets = self.data.valid_batches(self.cfg.logging.eval_iters, self.eval_languages(final))
        progress = ProgressLines(f"validation at iteration {self.state.iteration}", len(sets), self.info.rank == 0)
        for done, (name, batches) in enumerate(sets.items()):
            progress.update(done)
            mean = self.steps.evaluate(batches)
            key = "validation" if name == "overall" else f"validation/{name}"
            results[f"{key} loss"] = mean
            results[f"{key} ppl"] = math.exp(min(mean, 20.0))
        self.engine.train()
        return results

    # -- the loop -------------------------------------------------------------------------------

    def total_iterations(self) -> int:
        """Iterations in the whole run (with ramp-up, counted by replaying the ramp)."""
        if self.cfg.training.train_iters is not None:
            return self.cfg.training.train_iters
        steps, consumed = 0, 0
        while consumed < self.train_samples:
            consumed += self.rampup(consumed)
            steps += 1
        return steps

    def train(self) -> TrainState:
        """Run until the configured number of samples (or iterations) is consumed, or until the
        lifecycle asks to stop; either way the run ends with a checkpoint when saving is on."""
        cfg, s = self.cfg, self.state
        total = self.total_iterations()
        self.lifecycle.begin(s.iteration)
        self.stop_reason = self.lifecycle.check_before_start()
        if self.stop_reason:
            if self.info.rank == 0:
                console(f"not training: {self.stop_reason}")
            return s
        log_every, eval_every = cfg.logging.log_interval, cfg.logging.eval_interval
        save_every = cfg.checkpoint.save_interval
        progress = tqdm(total=total, initial=s.iteration, desc="train", unit="it", dynamic_ncols=True,
                        disable=self.info.rank != 0 or not show_progress())
        window_time, window_samples, window = 0.0, 0, []
        self.engine.train()
        if s.iteration == 0 and eval_every:
            self._log_eval()
        while s.iteration < total:
            start = time.perf_counter()
            step = self.skip_step() if self.lifecycle.skips(s.iteration + 1) else self.train_step()
            if not step.get("data-skipped"):  # a skipped iteration's data is read, not trained on
                window_time += time.perf_counter() - start
                window_samples += step["batch-size"]
            window.append(step)
            progress.update(1)
            progress.set_postfix(loss=f"{step['lm loss']:.3f}", lr=f"{step['learning-rate']:.2e}")
            if s.iteration % log_every == 0 or s.iteration == total:
                self._log_train(window, window_time, window_samples, progress)
                window_time, window_samples, window = 0.0, 0, []
            if eval_every and (s.iteration % eval_every == 0 or s.iteration == total):
                self._log_eval(final=s.iteration == total)
            if cfg.parallel.tp_sync_check_interval and s.iteration % cfg.parallel.tp_sync_check_interval == 0:
                self.check_tp_duplicates()
            if save_every and cfg.checkpoint.save and s.iteration % save_every == 0 and s.iteration != total:
                self.save()
            self.stop_reason = self.lifecycle.check(s.iteration)
            if self.stop_reason:
                break
        progress.close()
        if cfg.checkpoint.save and self._saved_iteration != s.iteration:
            self.save()
        if self.stop_reason and self.info.rank == 0:
            saved = (f"checkpoint {cfg.checkpoint.save} is at iteration {s.iteration}; start the same command to resume"
                     if cfg.checkpoint.save else "checkpoint.save is not set: nothing was saved")
            console(f"stopping at iteration {s.iteration}/{total}: {self.stop_reason}; {saved}")
        return s

    def _log_train(self, window: list[dict[str, Any]], seconds: float, samples: int, progress: tqdm) -> None:
        cfg, s = self.cfg, self.state
        finite = [w["lm loss"] for w in window if not w["skipped"]]
        norms = [w["grad-norm"] for w in window if w["grad-norm"] is not None]
        last = window[-1]
        trained = sum(1 for w in window if not w.get("data-skipped"))
        scalars = {
            "lm loss": sum(finite) / len(finite) if finite else float("nan"),
            "learning-rate": last["learning-rate"],
            "batch-size": last["batch-size"],
            "grad-norm": norms[-1] if norms else None,
            "skipped-iterations": s.skipped_iterations,
            "consumed-tokens": s.consumed_tokens,
            "iteration-time": seconds / max(trained, 1),
        }
        scalars.update(throughput(cfg.model, cfg.padded_vocab_size, samples, seconds, self.info.world_size,
                                  cfg.training.checkpoint_activations, cfg.logging.peak_flops_per_device))
        dp = self.parallel.dp_size
        scalars["samples-per-second-per-replica"] = scalars["samples-per-second"] / dp
        scalars["tokens-per-second-per-replica"] = scalars["tokens-per-second"] / dp
        scalars.update(_memory_stats(self.info.device))
        self.logger.log(s.iteration, scalars, kind="train", samples=s.consumed_samples, tokens=s.consumed_tokens)
        if self.info.rank == 0:
            console(format_train_line(s.iteration, self.total_iterations(), scalars, s.consumed_samples,
                                      s.consumed_tokens))

    def _log_eval(self, final: bool = False) -> None:
        results = self.evaluate(final)
        self.logger.log(self.state.iteration, results, kind="valid", samples=self.state.consumed_samples,
                        tokens=self.state.consumed_tokens)
        if self.info.rank == 0 and "validation loss" in results:
            console(f"validation at iteration {self.state.iteration}: loss {results['validation loss']:.4f}, "
                    f"ppl {results['validation ppl']:.2f} (blend; {len(results) // 2 - 1} of "
                    f"{len(self.data.valid_languages)} languages evaluated)")

    def save(self) -> None:
        """Checkpoint the engine and the loop's state (see megatron.checkpoint.checkpointing)."""
        self.check_tp_duplicates()
        s = self.state
        # The next step's values: functions of the consumed data, recorded to check a resume.
        schedule = {"next_learning_rate": self.schedule(s.consumed_samples, s.consumed_tokens),
                    "next_global_batch_size": self.rampup(s.consumed_samples)}
        self.checkpointer.save(self.engine, asdict(s), schedule)
        self._saved_iteration = s.iteration


def _memory_stats(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"mem-allocated-gb": torch.cuda.memory_allocated(device) / 2**30,
            "mem-max-allocated-gb": torch.cuda.max_memory_allocated(device) / 2**30}


def print_samples(cfg: Config, model: torch.nn.Module, tokenizer, device: torch.device) -> None:
    """Greedy continuations of the configured prompts (single-device model)."""
    model.eval()
    for prompt in cfg.logging.sample_prompts:
        ids = torch.tensor([tokenizer.encode(prompt)], device=device)
        out = model.generate_greedy(ids, cfg.logging.sample_tokens, eos_id=tokenizer.eod_id)
        text = tokenizer.decode(out[0, ids.shape[1]:].tolist())
        print(f"  {prompt!r} -> {text!r}", flush=True)


def build_network(cfg: Config, parallel: ParallelState, device: torch.device,
                  rng_tracker: Optional[RNGStatesTracker] = None) -> torch.nn.Module:
    """The model for this rank: a PipelineModule when PP > 1, else the TP-aware BLOOM; dropout
    draws from ``rng_tracker`` where activations differ across TP ranks."""
    t, p = cfg.training, cfg.parallel
    if parallel.pp_enabled:
        return build_pipeline_model(cfg, parallel, cfg.training.seed, rng_tracker).to(device)
    return build_model(cfg.model, cfg.padded_vocab_size, device=device,
                       tp_group=parallel.tp_group_or_none,
                       sequence_parallel=p.sequence_parallel, seed=t.seed,
                       checkpoint_num_layers=t.checkpoint_num_layers if t.checkpoint_activations else 0,
                       rng_tracker=rng_tracker)


def build_rng_tracker(cfg: Config, parallel: ParallelState, device: torch.device) -> RNGStatesTracker:
    """The tensor-parallel random stream of this rank (Megatron's seeds); saved in checkpoints."""
    tracker = RNGStatesTracker(device)
    tracker.add(MODEL_PARALLEL_RNG, model_parallel_seed(cfg.training.seed, parallel.tp_rank, parallel.pp_rank)[1])
    return tracker


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
    info = init_distributed()
    cfg.validate(info.world_size)
    configure_logging(info.rank, cfg.logging)
    cfg, precision = resolve_precision(cfg, info.device)
    announce(precision, info.rank)
    p = cfg.parallel
    parallel = ParallelState(info.world_size, info.rank, p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
    # Megatron's seeds: the default stream differs per pipeline stage (different layers), not per
    # TP rank (duplicated activations must draw equal masks); the tracker's differs per TP rank.
    set_seed(model_parallel_seed(cfg.training.seed, parallel.tp_rank, parallel.pp_rank)[0])
    tracker = build_rng_tracker(cfg, parallel, info.device)
    if info.rank == 0 and cfg.logging.run_dir:
        save_config(cfg, Path(cfg.logging.run_dir) / "config.yaml")
        layout = {"tp": parallel.tp_size, "pp": parallel.pp_size, "dp": parallel.dp_size, "zero_stage": p.zero_stage}
        write_environment(cfg.logging.run_dir, describe_environment(
            cfg, info.world_size, layout, info.device, precision.name, precision.reason))
    data = build_training_data(cfg, parallel)
    model = build_network(cfg, parallel, info.device, tracker)
    rampup = BatchSizeRampup.from_config(cfg.training)
    checkpointer = Checkpointer(cfg, parallel, tracker)
    weights_only = initial_weights(cfg)
    if weights_only is not None:
        # An HF import or a published BLOOM checkpoint: weights (resharded to this TP size) and a
        # fresh optimizer, from iteration 0. Loaded before DeepSpeed copies the master weights.
        load_layer_files_into(model, weights_only, parallel, cfg.model.num_layers)
        logging.getLogger(__name__).info("initialised the weights from %s (fresh optimizer)", weights_only)
    resume = None if weights_only is not None else checkpointer.find_resume_point()
    if resume is not None:
        checkpointer.prepare(resume)
    # With a pipeline DeepSpeed builds its grid from the PipelineModule's topology and refuses an mpu.
    engine = build_engine(cfg, model, parallel.dp_size, rampup(0), mpu=None if parallel.pp_enabled else parallel,
                          load_universal=resume is not None and resume.universal)
    loaded = checkpointer.load(engine, resume) if resume is not None else None
    state = TrainState.from_dict(loaded.train_state) if loaded else TrainState()
    logger = MetricsLogger(cfg.logging.run_dir, cfg.logging.tensorboard_dir, info.rank)
    try:
        trainer = Trainer(cfg, info, parallel, engine, data, logger, state, checkpointer, lifecycle, loaded)
        state = trainer.train()
        if on_finish is not None:
            on_finish(engine, parallel)
        finished = trainer.stop_reason is None
        whole_model_here = not (parallel.tp_enabled or parallel.pp_enabled)
        if finished and info.rank == 0 and cfg.logging.sample_prompts and whole_model_here:
            print("greedy continuations:", flush=True)
            print_samples(cfg, engine.module, data.tokenizer, info.device)
    finally:
        logger.close()
        shutdown_distributed()
    return state
