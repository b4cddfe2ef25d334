"""Hangs that name the rank (megatron/core/watchdog.py) and workers that die with their launcher.

The end-to-end hang across two hosts, with the training loop and a SIGSTOPped rank, is in
tests/test_two_hosts.py (``make test-hosts``); here: the diagnosis from heartbeats, a rank whose
data loading never returns in a real two-rank gloo job, and a torchrun agent killed with -9; and,
in ``make test-slow``, ranks of pretrain_bloom.py stuck in evaluation and in data loading.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from launch import run_command
from megatron.core.watchdog import EXIT_HANG, FAULT_ENV, HangFault, Heartbeat, diagnose
from training_utils import synthetic_corpus, tiny_run

WORKER = REPO / "tests" / "hang_worker.py"
NOW = 1_000_000.0


def beat(rank: int, collective: str | None, age: float, since_age: float = 70.0, phase: str = "train step",
         iteration: int = 5) -> Heartbeat:
    return Heartbeat(rank=rank, host=f"node{rank // 2}", pid=100 + rank, tp=rank % 2, pp=0, dp=rank // 2,
                     iteration=iteration, phase=phase, since=NOW - since_age, beat=NOW - age, collective=collective,
                     where="megatron/training/steps.py:48 in train")


def test_diagnose_names_the_stopped_the_busy_and_the_silent_rank_not_the_waiting_ones():
    beats = {
        0: beat(0, "all_reduce", age=1),
        1: beat(1, "all_reduce", age=30, iteration=4, phase="stop check"),  # stopped 30 s ago
        2: beat(2, None, age=1, phase="data loading"),  # alive, never reaches the collective
        3: None,  # never published
        4: beat(4, "broadcast", age=2),
    }
    stuck = diagnose(beats, world_size=5, now=NOW, stale_s=17)
    assert [rank for rank, _ in stuck] == [1, 2, 3]
    assert stuck[0][1] == ("rank 1 on node0 (TP 1, PP 0, DP 0), pid 101: no heartbeat for 30 s (the process is "
                           "stopped, dead, or its host unreachable); last seen in iteration 4, phase 'stop check', "
                           "waiting in all_reduce, at megatron/training/steps.py:48 in train")
    assert stuck[1][1].startswith("rank 2 on node1 (TP 0, PP 0, DP 1), pid 102: alive but busy outside any "
                                  "collective for 70 s while other ranks wait; iteration 5, phase 'data loading'")
    assert stuck[2][1].startswith("rank 3: no heartbeat at all")


def test_diagnose_names_nobody_when_every_rank_waits_or_nobody_does():
    waiting = {r: beat(r, "all_reduce", age=1) for r in range(2)}
    assert diagnose(waiting, world_size=2, now=NOW, stale_s=17) == []
    # Nobody waits in a collective (one long phase everywhere): no rank is to blame more than another.
    busy = {r: beat(r, None, age=1) for r in range(2)}
    assert diagnose(busy, world_size=2, now=NOW, stale_s=17) == []


def test_the_injected_fault_is_read_for_its_rank_only_and_checked():
    environ = {FAULT_ENV: "3:evaluation:2:sleep"}
    assert HangFault.from_env(3, environ) == HangFault(3, "evaluation", 2, "sleep")
    assert HangFault.from_env(1, environ) is None
    with pytest.raises(ValueError, match="expected RANK:PHASE:ITERATION:sleep|stop"):
        HangFault.from_env(0, {FAULT_ENV: "3:evaluation"})
    with pytest.raises(ValueError, match="the action must be sleep or stop"):
        HangFault.from_env(0, {FAULT_ENV: "0:evaluation:2:crash"})


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            str(WORKER), *args]


@pytest.mark.distributed
@pytest.mark.slow  # 25 s; the two-host tier names a rank stuck in a training step
def test_a_rank_stuck_in_data_loading_is_named_and_both_ranks_exit():
    timeout_s = 3.0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           FAULT_ENV: "1:data loading:3:sleep"}
    start = time.monotonic()
    result = run_command(torchrun("hang", str(timeout_s)), timeout=60, cwd=REPO, env=env)
    elapsed = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert output.count(f"exitcode  : {EXIT_HANG}") == 2, output[-3000:]
    host = re.escape(os.uname().nodename)
    assert re.search(rf"stuck: rank 1 on {host} \(TP 0, PP 0, DP 1\), pid \d+: alive but busy outside any collective "
                     rf"for \d+ s while other ranks wait; iteration 3, phase 'data loading', not in a collective, "
                     rf"at megatron/core/watchdog.py:\d+ in trigger", output), output[-3000:]
    assert re.search(r"hang: rank 0 on .* made no progress for \d+ s \(parallel.distributed_timeout_minutes=0.05\) "
                     r"in iteration 3, phase 'train step', waiting in all_reduce, at tests/hang_worker.py:\d+ in hang",
                     output), output[-3000:]
    print(f"hang detected and the job ended in {elapsed:.1f} s (timeout {timeout_s} s, start-up included)")


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.distributed
def test_workers_die_within_seconds_when_torchrun_is_killed():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    agent = subprocess.Popen(torchrun("orphan"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             cwd=REPO, env=env, start_new_session=True)
    workers = []
    try:
        ready = [agent.stdout.readline() for _ in range(2)]
        assert all(line.startswith("ready ") for line in ready), ready
        workers = children(agent.pid)
        assert sorted(workers) == sorted(int(line.split()[1]) for line in ready)
        agent.send_signal(signal.SIGKILL)  # the agent only: its workers are left to the kernel
        agent.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in workers), "workers outlived their torchrun agent by 10 s"
    finally:
        for pid in workers:  # reaped by init; killed here only if the test failed
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("phase", ["evaluation", "data loading"])
def test_the_training_loop_names_a_rank_stuck_in(phase, tmp_path):
    """Through pretrain_bloom.py (TP2 over two ranks): rank 1 hangs in ``phase`` at iteration 2;
    both ranks end within the timeout (0.25 min here) plus a margin, naming rank 1 and the phase."""
    timeout_s = 15
    body = tiny_run(tmp_path, synthetic_corpus(tmp_path / "corpus"),
                    parallel={"tensor_model_parallel_size": 2, "distributed_timeout_minutes": timeout_s / 60},
                    training={"train_iters": 4}, logging={"eval_interval": 2, "eval_iters": 1})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(body))
    env = {**os.environ, "OMP_NUM_THREADS": "1", FAULT_ENV: f"1:{phase}:2:sleep"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "pretrain_bloom.py", "--config", str(config)]
    result = run_command(command, timeout=300, cwd=REPO, env=env)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    found = re.search(r"fault injection: rank 1 hangs \(sleep\) .* at ([0-9.]+)", output)
    assert found, "rank 1 never reached the injected hang:\n" + output[-3000:]
    hung_at = float(found.group(1))
    assert output.count(f"exitcode  : {EXIT_HANG}") == 2, output[-3000:]
    assert re.search(rf"stuck: rank 1 on \S+ \(TP 1, PP 0, DP 0\), pid \d+: alive but busy outside any collective "
                     rf"for \d+ s while other ranks wait; iteration 2, phase '{phase}'", output), output[-3000:]
    assert time.time() - hung_at <= timeout_s + 30, "the job outlived the timeout by more than 30 s"
