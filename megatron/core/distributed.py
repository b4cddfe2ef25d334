"""Starting the default process group the same way under torchrun, srun, deepspeed or plain python;
and ``on_rank0``, for work one process does on behalf of all.

A process started by a launcher dies with it (:func:`die_with_launcher`): a torchrun agent killed
by a test's timeout or a node failure must not leave its workers training on as orphans, and a
worker blocked in a collective ignores SIGTERM.

torchrun and the deepspeed launcher set RANK / WORLD_SIZE / LOCAL_RANK; srun sets SLURM_*
instead, and without RANK DeepSpeed would try MPI discovery (and fail without mpi4py), so the
SLURM variables are translated first. A plain ``python pretrain_bloom.py`` runs as a world of one.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch

from megatron.errors import ProjectError, ReportedByRank0

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# The process groups time out this much later than the watchdog (megatron/core/watchdog.py), whose
# report names the stuck rank where gloo's or NCCL's own timeout error would not.
PROCESS_GROUP_GRACE_S = 30.0


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process sits in the world."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fill_launcher_env() -> None:
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        if env["WORLD_SIZE"] != "1":
            raise RuntimeError("MASTER_PORT is not set for a multi-process run: launch with torchrun or set it")
        env["MASTER_PORT"] = str(_free_port())


def launched_by_launcher(environ=os.environ) -> bool:
    """Whether a launcher started this process: torchrun, the deepspeed launcher and
    multiprocessing-based ones set LOCAL_RANK, srun sets SLURM_PROCID."""
    return "LOCAL_RANK" in environ or "SLURM_PROCID" in environ


def die_with_launcher() -> bool:
    """Have the kernel SIGKILL this process when its parent (the launcher) dies; True when set.

    SIGKILL, not SIGTERM: training turns SIGTERM into a save at the next step boundary
    (megatron/training/lifecycle.py), which a rank blocked in a collective never reaches. Linux
    only (prctl PR_SET_PDEATHSIG); elsewhere a warning says so and nothing changes."""
    log = logging.getLogger(__name__)
    if not sys.platform.startswith("linux"):
        log.warning("not on Linux: this process will not stop by itself if its launcher dies")
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this process will not stop by itself if its "
                    "launcher dies", ctypes.get_errno())
        return False
    if os.getppid() != parent:  # the launcher died before the request took effect
        os._exit(1)
    return True


def init_distributed(timeout_minutes: float = 10.0) -> DistributedInfo:
    """Initialise the default group (NCCL on GPUs, gloo on CPU) once; return this rank's place.

    ``timeout_minutes`` is ``parallel.distributed_timeout_minutes``: the process groups wait
    :data:`PROCESS_GROUP_GRACE_S` longer, so that the watchdog names a stuck rank first. Under a
    launcher, this process is made to die with it (:func:`die_with_launcher`).
    """
    import deepspeed

    if launched_by_launcher():
        die_with_launcher()
    _fill_launcher_env()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=timedelta(seconds=timeout_minutes * 60 + PROCESS_GROUP_GRACE_S))
    return DistributedInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def shutdown_distributed() -> None:
    """Barrier, then destroy the group (gloo sometimes aborts at exit without the barrier)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def on_rank0(fn: Callable[[], T], task: str) -> T:
    """Run ``fn`` on global rank 0 only; every rank returns its result or raises its error.

    In a world of several processes this is a collective over the default group (every rank
    calls it, in the same order), and the result must be picklable. Rank 0 broadcasts its
    outcome, which also keeps the other ranks from going on (reading what it writes) before it
    is done. When ``fn`` raises, rank 0 re-raises its own exception and every other rank raises
    ``RuntimeError("rank R: rank 0 failed to <task>: <error>")`` (``ReportedByRank0``, which only
    rank 0 prints, when rank 0's error is a :class:`~megatron.errors.ProjectError`); without the
    broadcast they would wait in their next collective until a timeout, far from the cause. Without
    ``torch.distributed`` (or in a world of one) ``fn`` simply runs here.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_world_size() == 1:
        return fn()
    rank = torch.distributed.get_rank()
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as exc:  # re-raised below, once the other ranks have been told
            error = exc
    failure = None if error is None else (f"{type(error).__name__}: {error}", isinstance(error, ProjectError))
    box = [(result, failure)]
    torch.distributed.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    result, failure = box[0]
    if failure is not None:
        message, expected = failure
        # An expected error's message is printed by rank 0 alone (megatron.errors.reports_errors).
        raise (ReportedByRank0 if expected else RuntimeError)(f"rank {rank}: rank 0 failed to {task}: {message}")
    return result
