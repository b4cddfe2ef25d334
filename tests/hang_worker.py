"""A two-rank gloo job for the watchdog and launcher tests; run under torchrun:

    torchrun --standalone --nproc-per-node 2 tests/hang_worker.py hang TIMEOUT_S
    torchrun --standalone --nproc-per-node 2 tests/hang_worker.py orphan

``hang``: each rank runs iterations of "read a batch through Progress.batches, then all-reduce",
watched by megatron.core.watchdog with the given timeout; a hang injected through
MEGATRON_TEST_HANG stops one rank, and the watchdogs end the job. The ranks stand for a TP1 x DP2
layout: rank r is (TP 0, PP 0, DP r).

``orphan``: the worker makes itself die with its launcher, as init_distributed does under one,
ignores SIGTERM (as a rank blocked in a collective does), prints ``ready <pid>``, and waits:
rank 0 in a barrier, rank 1 asleep. Only the death of the launcher can end it.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from megatron.core.distributed import die_with_launcher, launched_by_launcher
from megatron.core.watchdog import Identity, Progress, Watchdog


def hang(timeout_s: float) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    progress = Progress(rank)
    with Watchdog(progress, Identity.of_this_process(rank, world, tp=0, pp=0, dp=rank), timeout_s):
        batches = progress.batches(iter(range(1000)))
        for iteration in range(1, 1000):
            progress.mark("train step", iteration)
            value = torch.tensor([float(next(batches))])
            dist.all_reduce(value)
            time.sleep(0.05)


def orphan() -> None:
    assert launched_by_launcher() and die_with_launcher()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # One write(2) of the whole line: under 4 KB to a pipe, it cannot interleave with the other
    # rank's (print may write the text and the newline separately, and did: "ready 1ready 2").
    os.write(sys.stdout.fileno(), f"ready {os.getpid()}\n".encode())
    if dist.get_rank() == 0:
        dist.barrier()
    else:
        time.sleep(600)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    if sys.argv[1] == "hang":
        hang(float(sys.argv[2]))
    else:
        orphan()
