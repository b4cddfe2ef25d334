"""When a run must stop early, and which iterations it must skip: one object, asked once per step.

BLOOM-176B ran for months in 100-hour SLURM jobs on shared machines. What it needed, and what
:class:`RunLifecycle` provides:

* a kill-switch file (``training.kill_switch_path``): create it to make the run save and stop
  at the next step, from any machine that sees the file system;
* ``training.exit_duration_in_mins``: save and stop once the job has run this long, before the
  scheduler's time limit kills it (BLOOM: 5990 of 6000 minutes; leave time for one save);
* SIGTERM and SIGUSR1 (``sbatch --signal=USR1@600``, preemption, ``scancel``): the handler only
  sets a flag; the run saves at the next step boundary and exits with status 0, so a requeued
  job resumes from that checkpoint;
* ``training.exit_interval``: save and stop every N iterations (planned restarts, tests);
* ``training.skip_train_iteration_range`` ("START-END", inclusive, 1-based iteration numbers):
  those iterations consume their data but run no forward or backward, BLOOM's way past the
  batches behind a loss spike.

Ranks must agree on stopping, or some would wait forever in the next collective: the reasons
are all-reduced (MAX) over the world every step, so one rank that got the signal or saw the file
stops them all at the same iteration.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron.config import TrainingConfig, parse_iteration_range

logger = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# Positions in the all-reduced flag vector; order also sets which reason is reported first.
_SIGNAL, _KILL_SWITCH, _DURATION, _INTERVAL = range(4)


class RunLifecycle:
    """Stop conditions and skip ranges of one run; ``check`` is collective (call it on every rank).

    ``start_time`` is ``time.time()`` when the job started (its duration counts from there).
    """

    def __init__(self, training: TrainingConfig, start_time: float, clock: Callable[[], float] = time.time):
        self.kill_switch = Path(training.kill_switch_path) if training.kill_switch_path else None
        self.exit_duration_s = training.exit_duration_in_mins * 60.0 if training.exit_duration_in_mins else None
        self.exit_interval = training.exit_interval
        self.skip_ranges = [parse_iteration_range(span) for span in training.skip_train_iteration_range]
        self.start_time = start_time
        self.clock = clock
        self.received_signal: Optional[int] = None
        self.first_iteration = 0  # the iteration the run (re)started at: no exit_interval stop there
        self._previous_handlers: dict[int, object] = {}

    # -- signals --------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame) -> None:
        # Only a flag: the step in progress finishes, then the run saves and exits cleanly.
        self.received_signal = signum

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator[None]:
        """Within the block, SIGTERM and SIGUSR1 request a save-and-exit instead of killing."""
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not in the main thread: SIGTERM/SIGUSR1 will not trigger a save before exiting")
            yield
            return
        for signum in HANDLED_SIGNALS:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        try:
            yield
        finally:
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler)
            self._previous_handlers.clear()

    # -- per step -------------------------------------------------------------------------------

    def begin(self, iteration: int) -> None:
        """Note the iteration the run starts (or resumes) at."""
        self.first_iteration = iteration

    def skips(self, iteration: int) -> bool:
        """Whether iteration ``iteration`` (1-based: the step that makes it the count) is skipped."""
        return any(start <= iteration <= end for start, end in self.skip_ranges)

    def check(self, iteration: int) -> Optional[str]:
        """Why the run must save and stop after ``iteration`` completed steps (None: go on).

        Every rank gets the same answer: local flags are all-reduced with MAX.
        """
        flags = self._local_flags()
        flags[_DURATION] = int(self.exit_duration_s is not None and self.elapsed() >= self.exit_duration_s)
        flags[_INTERVAL] = int(bool(self.exit_interval) and iteration > self.first_iteration
                               and iteration % self.exit_interval == 0)
        return self._reason(flags)

    def check_before_start(self) -> Optional[str]:
        """Why the run must not start training at all: a signal during start-up, or the kill switch
        (a job requeued after the switch was set). Time and interval limits count only after a
        step, so a run always makes progress before it saves. Collective, like :meth:`check`."""
        return self._reason(self._local_flags())

    def _local_flags(self) -> torch.Tensor:
        flags = torch.zeros(4, dtype=torch.int32, device=_collective_device())
        flags[_SIGNAL] = 0 if self.received_signal is None else int(self.received_signal)
        flags[_KILL_SWITCH] = int(self.kill_switch is not None and self.kill_switch.exists())
        return flags

    def _reason(self, flags: torch.Tensor) -> Optional[str]:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        flags = flags.tolist()
        if flags[_SIGNAL]:
            return f"received {signal.Signals(flags[_SIGNAL]).name}"
        if flags[_KILL_SWITCH]:
            return f"kill switch {self.kill_switch} exists (delete it to let the run continue)"
        if flags[_DURATION]:
            return (f"training.exit_duration_in_mins={self.exit_duration_s / 60:g} reached "
                    f"({self.elapsed() / 60:.2f} min since the job started)")
        if flags[_INTERVAL]:
            return f"training.exit_interval={self.exit_interval} reached"
        return None

    def elapsed(self) -> float:
        """Seconds since the job started."""
        return self.clock() - self.start_time


def _collective_device() -> torch.device:
    # NCCL reduces only GPU tensors; gloo (CPU runs) only CPU ones.
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def job_start_time() -> float:
    """When this job started: SLURM's start time when known (``SLURM_JOB_START_TIME``), else now.

    A value that is not a number is reported, not silently replaced: counted from now, the
    ``training.exit_duration_in_mins`` deadline moves later than the job's real time limit."""
    value = os.environ.get("SLURM_JOB_START_TIME")
    if not value:
        return time.time()
    try:
        return float(value)
    except ValueError:
        logger.warning("SLURM_JOB_START_TIME=%r is not a Unix time: training.exit_duration_in_mins counts from "
                       "now instead, which can run past the job's time limit; unset it or fix the launcher", value)
        return time.time()
