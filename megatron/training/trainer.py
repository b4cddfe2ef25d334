"""The training loop: ``Trainer.train()`` runs a run that megatron/training/pretrain.py assembled.

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

import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator, Optional

import torch
from tqdm import tqdm

from megatron.checkpoint.checkpointing import Checkpointer, CheckpointSaveFailed, Resumed
from megatron.config import Config
from megatron.core.distributed import DistributedInfo
from megatron.core.parallel_state import ParallelState
from megatron.core.tensor_parallel import check_tp_duplicates_in_sync
from megatron.core.watchdog import Progress
from megatron.errors import ProjectError
from megatron.training.data import TrainingData
from megatron.training.engine import set_learning_rate
from megatron.training.lifecycle import RunLifecycle
from megatron.training.logging import (
    MetricsLogger,
    ProgressLines,
    console,
    format_train_line,
    format_valid_line,
    format_valid_table,
    train_scalars,
    valid_scalars,
)
from megatron.training.metrics import throughput
from megatron.training.schedules import (
    BatchSizeRampup,
    LearningRateSchedule,
    total_train_iterations,
    total_train_samples,
)
from megatron.training.steps import EngineSteps, PipelineSteps
from megatron.utils.terminal import show_progress


class TooManySkippedSteps(ProjectError, RuntimeError):
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


@dataclass(frozen=True)
class StepResult:
    """What one iteration did: the loop reads it, megatron/training/logging.py names it for the logs."""

    loss: float  # mean over the global batch; NaN when the iteration's data was skipped
    learning_rate: float
    batch_size: int
    grad_norm: Optional[float]  # None when no update was applied
    skipped: bool  # no update: a non-finite loss or gradient, or the data skipped on purpose
    data_skipped: bool  # in training.skip_train_iteration_range: the data was read, not trained on


class Trainer:
    """Owns the loop; every collaborator is passed in, nothing is global.

    ``resumed`` holds the engine and the checkpoint it was loaded from, if any: the loop
    continues from that checkpoint's state, and its random streams are restored once the data
    iterator exists, so the resumed run draws exactly what the uninterrupted run drew.
    ``progress`` hears of every phase and micro-batch, for the watchdog (megatron/core/watchdog.py).
    """

    def __init__(self, cfg: Config, info: DistributedInfo, parallel: ParallelState, resumed: Resumed,
                 data: TrainingData, logger: MetricsLogger, checkpointer: Checkpointer, lifecycle: RunLifecycle,
                 progress: Optional[Progress] = None):
        self.cfg = cfg
        self.info = info
        self.parallel = parallel
        self.engine = resumed.engine
        self.data = data
        self.logger = logger
        loaded = resumed.checkpoint
        self.state = TrainState.from_dict(loaded.train_state) if loaded is not None else TrainState()
        self.checkpointer = checkpointer
        self.lifecycle = lifecycle
        self.progress = progress if progress is not None else Progress(info.rank)
        self.stop_reason: Optional[str] = None  # why the run stopped before the end, if it did
        # A resumed run need not save again before its first step (same directory only).
        same_directory = cfg.checkpoint.load == cfg.checkpoint.save
        self._saved_iteration: Optional[int] = self.state.iteration if loaded is not None and same_directory else None
        steps = PipelineSteps if parallel.pp_enabled else EngineSteps
        self.steps = steps(self.engine, parallel, info.device)
        self.rampup = BatchSizeRampup.from_config(cfg.training)
        self.train_samples = total_train_samples(cfg.training, self.rampup)
        self.total_iterations = total_train_iterations(cfg.training, self.rampup)
        self.schedule = LearningRateSchedule.from_config(cfg.optimizer, self.train_samples, cfg.model.seq_length)
        self._batches: Iterator[dict[str, torch.Tensor]] = self.progress.batches(
            data.train_loader(self.state.consumed_samples))
        # Every evaluation reads the same batches: read them once. Their loaders' draws from torch's
        # generator are undone here and made at each evaluation instead (see evaluate).
        self.progress.mark("reading the validation batches")
        with torch.random.fork_rng(devices=[]):
            wanted = cfg.logging.eval_interval or cfg.training.eval_only
            self._valid_batches = data.valid_batches(cfg.logging.eval_iters) if wanted else {}
        if loaded is not None:
            self._check_schedule(loaded.schedule)
            self.checkpointer.restore_rng(loaded)

    def _check_schedule(self, saved: dict[str, Any]) -> None:
        """Warn when the resumed run's next learning rate or batch size is not the saved run's
        (the schedule or ramp-up settings changed since the save; sometimes on purpose)."""
        s = self.state
        changed = {k: (saved[k], v) for k, v in self._next_schedule().items() if k in saved and saved[k] != v}
        if changed and self.info.rank == 0:
            console(f"warning: resuming at iteration {s.iteration} with {changed} (checkpoint, now): the "
                    "optimizer or training settings differ from the saved run's")

    # -- one step -------------------------------------------------------------------------------

    def _prepare_step(self) -> tuple[int, float]:
        batch_size = self.rampup(self.state.consumed_samples)
        if batch_size != self.engine.train_batch_size():
            self.engine.set_train_batch_size(batch_size)
        return batch_size, self.schedule(self.state.consumed_samples, self.state.consumed_tokens)

    def train_step(self) -> StepResult:
        """One optimizer step over the current global batch."""
        batch_size, lr = self._prepare_step()
        set_learning_rate(self.engine, lr)
        skipped_before = self.engine.skipped_steps
        loss = self.steps.train(self._batches)
        skipped = self.engine.skipped_steps > skipped_before or not math.isfinite(loss)
        self._advance(batch_size, skipped)
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        return StepResult(loss, lr, batch_size, None if skipped else grad_norm, skipped, data_skipped=False)

    def skip_step(self) -> StepResult:
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
        return StepResult(float("nan"), lr, batch_size, None, skipped=True, data_skipped=True)

    def check_tp_duplicates(self) -> None:
        """Fail loudly when parameters duplicated across TP ranks (LayerNorms, row-parallel
        biases) differ: BLOOM-176B lost weeks to such copies drifting apart."""
        if not self.parallel.tp_enabled:
            return
        self.progress.mark("tensor-parallel sync check", self.state.iteration)
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

    def eval_languages(self, final: bool) -> list[str]:
        """Languages to evaluate now: all, or ``logging.eval_languages_per_interval`` of them in
        turn. The turn is a function of the iteration, so a resumed run picks what the
        uninterrupted one would have."""
        n, every = self.cfg.logging.eval_languages_per_interval, self.cfg.logging.eval_interval
        languages = self.data.valid_languages
        if final or n is None or n >= len(languages) or not every:
            return languages
        start = (self.state.iteration // every) * n
        return [languages[(start + i) % len(languages)] for i in range(n)]

    @torch.no_grad()
    def evaluate(self, final: bool = False) -> dict[str, float]:
        """Validation loss of the blend ("overall") and of each language evaluated now, averaged
        over tokens and DP ranks (at ``final``, every language whatever
        ``logging.eval_languages_per_interval`` says)."""
        self.engine.eval()
        losses = {}
        names = ["overall", *self.eval_languages(final)]
        sets = {name: self._valid_batches[name] for name in names if name in self._valid_batches}
        # Evaluations used to open a DataLoader per set, which draws a seed from torch's generator:
        # draw as many, so that runs with dropout (and their checkpoints) stay bit for bit those of
        # earlier versions.
        for _ in sets:
            torch.empty((), dtype=torch.int64).random_()
        progress = ProgressLines(f"validation at iteration {self.state.iteration}", len(sets), self.info.rank == 0)
        for done, (name, batches) in enumerate(sets.items()):
            progress.update(done)
            self.progress.mark("evaluation", self.state.iteration)
            losses[name] = self.steps.evaluate(batches)
        self.engine.train()
        return losses

    # -- the loop -------------------------------------------------------------------------------

    def train(self) -> TrainState:
        """Run until the configured number of samples (or iterations) is consumed, or until the
        lifecycle asks to stop; either way the run ends with a checkpoint when saving is on."""
        cfg, s = self.cfg, self.state
        total = self.total_iterations
        self.lifecycle.begin(s.iteration)
        self.stop_reason = self.lifecycle.check_before_start()
        if self.stop_reason:
            if self.info.rank == 0:
                console(f"not training: {self.stop_reason}")
            return s
        if cfg.training.eval_only:
            return self.evaluate_only()
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
            self.progress.mark("train step", s.iteration + 1)
            step = self.skip_step() if self.lifecycle.skips(s.iteration + 1) else self.train_step()
            if not step.data_skipped:  # a skipped iteration's data is read, not trained on
                window_time += time.perf_counter() - start
                window_samples += step.batch_size
            window.append(step)
            progress.update(1)
            progress.set_postfix(loss=f"{step.loss:.3f}", lr=f"{step.learning_rate:.2e}")
            if s.iteration % log_every == 0 or s.iteration == total:
                self._log_train(window, window_time, window_samples)
                window_time, window_samples, window = 0.0, 0, []
            if eval_every and (s.iteration % eval_every == 0 or s.iteration == total):
                self._log_eval(final=s.iteration == total)
            if cfg.parallel.tp_sync_check_interval and s.iteration % cfg.parallel.tp_sync_check_interval == 0:
                self.check_tp_duplicates()
            if save_every and cfg.checkpoint.save and s.iteration % save_every == 0 and s.iteration != total:
                self.save()
            self.progress.mark("stop check", s.iteration)
            self.stop_reason = self.lifecycle.check(s.iteration)
            if self.stop_reason:
                break
        progress.close()
        if cfg.checkpoint.save and self._saved_iteration != s.iteration:
            self.save(final=True)
        if self.stop_reason and self.info.rank == 0:
            saved = (f"checkpoint {cfg.checkpoint.save} is at iteration {s.iteration}; start the same command to resume"
                     if cfg.checkpoint.save else "checkpoint.save is not set: nothing was saved")
            console(f"stopping at iteration {s.iteration}/{total}: {self.stop_reason}; {saved}")
        return s

    def evaluate_only(self) -> TrainState:
        """``training.eval_only``: every validation set once, at the loaded checkpoint's iteration,
        logged like any evaluation (metrics.jsonl, TensorBoard) and printed per language; no
        training step and no save."""
        s = self.state
        if self.info.rank == 0 and s.iteration == 0:
            console("warning: training.eval_only with no checkpoint loaded (checkpoint.load): evaluating the "
                    "freshly initialised model")
        scalars = self._log_eval(final=True)
        if self.info.rank == 0:
            console(format_valid_table(scalars))
        return s

    def _log_train(self, window: list[StepResult], seconds: float, samples: int) -> None:
        cfg, s = self.cfg, self.state
        speed = throughput(cfg.model, cfg.padded_vocab_size, samples, seconds, self.info.world_size,
                           cfg.training.checkpoint_activations, cfg.logging.peak_flops_per_device)
        scalars = train_scalars(window, seconds, s.skipped_iterations, s.consumed_tokens, speed, self.parallel.dp_size)
        scalars.update(_memory_stats(self.info.device))
        self.logger.log(s.iteration, scalars, kind="train", samples=s.consumed_samples, tokens=s.consumed_tokens)
        if self.info.rank == 0:
            console(format_train_line(s.iteration, self.total_iterations, scalars, s.consumed_samples,
                                      s.consumed_tokens))

    def _log_eval(self, final: bool = False) -> dict[str, float]:
        losses = self.evaluate(final)
        scalars = valid_scalars(losses)
        self.logger.log(self.state.iteration, scalars, kind="valid", samples=self.state.consumed_samples,
                        tokens=self.state.consumed_tokens)
        if self.info.rank == 0 and "overall" in losses:
            console(format_valid_line(self.state.iteration, scalars, len(losses) - 1, len(self.data.valid_languages)))
        return scalars

    def save(self, final: bool = False) -> None:
        """Checkpoint the engine and the loop's state (see megatron.checkpoint.checkpointing).

        A save that fills the disk raises, unless ``checkpoint.on_save_failure`` is ``continue``
        and this is not the run's last save: then training goes on and the next interval retries.
        """
        self.check_tp_duplicates()
        self.progress.mark("checkpoint save", self.state.iteration)
        try:
            self.checkpointer.save(self.engine, asdict(self.state), self._next_schedule())
        except CheckpointSaveFailed as exc:
            if final or self.cfg.checkpoint.on_save_failure != "continue":
                raise
            if self.info.rank == 0:
                console(f"warning: {exc}; continuing (checkpoint.on_save_failure: continue)")
            return
        self._saved_iteration = self.state.iteration

    def _next_schedule(self) -> dict[str, Any]:
        # Functions of the consumed data: a checkpoint records them so its resume can check them.
        s = self.state
        return {"next_learning_rate": self.schedule(s.consumed_samples, s.consumed_tokens),
                "next_global_batch_size": self.rampup(s.consumed_samples)}


def _memory_stats(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"mem-allocated-gb": torch.cuda.memory_allocated(device) / 2**30,
            "mem-max-allocated-gb": torch.cuda.max_memory_allocated(device) / 2**30}
