"""Run a test function on several CPU ranks (gloo), each in its own spawned process, or a
command (torchrun, a tool) in its own process group.

    results = run_ranks(worker, world_size=2, args=(config_dict,))
    result = run_command([python, "-m", "torch.distributed.run", ...], timeout=300)

``worker(rank, *args)`` runs with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* set as torchrun
would set them; whatever it returns on each rank comes back in rank order. A failure on any
rank fails the call with that rank's traceback.
"""

from __future__ import annotations

import os
import queue as queue_module
import signal
import socket
import subprocess
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        queue.put((rank, "ok", fn(rank, *args)))
    except BaseException:  # report every failure, including SystemExit, to the parent
        queue.put((rank, "error", traceback.format_exc()))
        raise


def run_ranks(fn: Callable, world_size: int, args: tuple = (), timeout: float = 300) -> list[Any]:
    """Run ``fn(rank, *args)`` on ``world_size`` spawned ranks; return their results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    context = mp.start_processes(_entry, args=(world_size, port, fn, args, queue), nprocs=world_size,
                                 join=False, start_method="spawn")
    results: dict[int, Any] = {}
    errors = []
    deadline = time.monotonic() + timeout
    while len(results) < world_size and not errors:
        try:
            rank, status, payload = queue.get(timeout=2)
        except queue_module.Empty:
            dead = [i for i, p in enumerate(context.processes) if p.exitcode not in (None, 0)]
            if dead:
                errors.append(f"rank(s) {dead} died without a result (exit codes "
                              f"{[context.processes[i].exitcode for i in dead]})")
            elif time.monotonic() > deadline:
                errors.append(f"timed out after {timeout} s with results from ranks {sorted(results)}")
            continue
        if status == "ok":
            results[rank] = payload
        else:
            errors.append(f"rank {rank} failed:\n{payload}")
    if errors:
        for process in context.processes:
            process.kill()
        raise AssertionError("\n".join(errors))
    context.join(timeout)
    return [results[r] for r in range(world_size)]


def run_command(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True)`` in a new session; on a timeout
    (or any interruption) the whole process group is killed, not only its leader. A timed-out
    ``torchrun`` would otherwise leave its training workers running, slowing every later test."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException:
        kill_group(process)
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the process group that ``process`` leads, and reap the leader."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.communicate()
