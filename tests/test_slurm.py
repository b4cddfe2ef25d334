"""The SLURM tier: a real single-node SLURM cluster runs slurm/cpu-tiny.slurm as a job chain.

Run it with ``make test-slurm`` (``pytest -m slurm tests/test_slurm.py``). It needs root: it
installs SLURM and munge with apt-get when missing and starts slurmctld, slurmd and munged
(scripts/slurm_cluster.sh), all in a temporary directory, and stops them by PID at the end,
also when a test fails. Without root or packages it skips with the reason.

What it checks, on the tiny config (two gloo ranks in one torchrun, a few dozen steps):

1. an uninterrupted run, started directly with torchrun, gives the reference losses;
2. the same run submitted as ``scripts/submit_chain.sh 2 slurm/cpu-tiny.slurm`` (an array
   with ``%1``): once the first job trains, its time limit is cut so that SLURM's own
   ``--signal=USR1@120`` fires (the real path, not ``scancel --signal``); the ranks save at the
   next step boundary and exit 0 before the limit; the second job resumes from ``latest``;
   once it has saved a checkpoint of its own, one of its ranks is killed with SIGKILL: the job
   requeues itself, starts again (same job id) and resumes from the newest complete checkpoint,
   losing at most ``checkpoint.save_interval`` steps, and finishes; every loss logged, by every
   run, equals the reference's for its step exactly;
3. a ``--dependency=afterany`` chain runs its jobs one after the other.

Two nodes (network namespaces) are tests/test_slurm_two_nodes.py, ``make test-slurm-nodes``.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from faults.run_trials import RESUMED
from slurm_testbed import (
    job_ranks,
    job_records,
    latest_step,
    reference_losses,
    seconds,
    slurm,
    start_cluster,
    tiny_overrides,
    train_losses,
    wait_until,
)

pytestmark = pytest.mark.slurm

# ~0.85 s each on two AVX2 cores in fp32 (two ranks of 4 x 256 tokens): after the time limit is
# cut at step 3 the signal needs up to ~30 s (slurmctld's time-limit pass runs every 30 s), so
# the first job is still training when it lands, and the second job has at least ~20 steps left
# in which to save (every SAVE_INTERVAL steps) and lose a rank.
STEPS = 60
SAVE_INTERVAL = 5
SIGNAL_LEAD_S = 120  # --signal=USR1@120 for the chain (the script's own header says @60)
START_TIMEOUT_S = 240
CHAIN_TIMEOUT_S = 420


# -- the cluster and the run ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(request):
    """The single-node cluster; yields the environment its clients need; stops it whatever happens."""
    yield from start_cluster(request, "make test-slurm")


def overrides(root: Path, corpus) -> list[str]:
    """The run of this module (STEPS steps, a save every SAVE_INTERVAL), everything under ``root``."""
    return tiny_overrides(root, corpus, STEPS, SAVE_INTERVAL)


@pytest.fixture(scope="module")
def reference(cluster, corpus, tmp_path_factory):
    """Losses of the uninterrupted run, started with torchrun directly (no SLURM)."""
    root = tmp_path_factory.mktemp("reference")
    return reference_losses(root, overrides(root, corpus), STEPS, cluster)


def test_chain_stops_on_usr1_resumes_and_requeues_a_job_that_lost_a_rank(cluster, corpus, reference, tmp_path):
    env = dict(cluster, BLOOM_LOG_DIR=str(tmp_path / "logs"))
    logs = tmp_path / "slurm-logs"
    logs.mkdir()
    checkpoints, run_dir = tmp_path / "checkpoints", tmp_path / "run"
    submitted = subprocess.run(
        ["bash", "scripts/submit_chain.sh", "2", "slurm/cpu-tiny.slurm", "--time=10",
         f"--signal=USR1@{SIGNAL_LEAD_S}", f"--output={logs}/%x-%j.out", "--", *overrides(tmp_path, corpus)],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert submitted.returncode == 0, submitted.stderr
    array_id = submitted.stdout.split()[0]

    def task(index: int):
        """(task id, job id, state, elapsed) of a task still in the queue, else None."""
        rows = [line.split("|") for line in slurm(env, "squeue", "-h", "-r", f"--jobs={array_id}",
                                                    "-o", "%i|%A|%T|%M").splitlines()]
        return next((row for row in rows if row[0] == f"{array_id}_{index}"), None)

    def first_task_training():
        row = task(1)
        if row is None:
            raise AssertionError(f"job {array_id}_1 ended before it was signalled: {job_records(env, array_id)}")
        return row if (run_dir / "metrics.jsonl").is_file() and len(train_losses(run_dir)) >= 3 else None

    first_job_id = wait_until(first_task_training, START_TIMEOUT_S, f"job {array_id}_1 to train a few steps")[1]
    # Cut the time limit to 75-135 s from now (SLURM counts limits in whole minutes). slurmctld
    # sends --signal's USR1 at its first time-limit pass (every 30 s) that finds the job within
    # SIGNAL_LEAD_S (+ up to one pass) of its limit: that is the next pass, and the save has a
    # minute or more before the limit.
    elapsed = seconds(slurm(env, "squeue", "-h", f"--jobs={first_job_id}", "-o", "%M").strip())
    limit_minutes = math.ceil((elapsed + 75) / 60)
    slurm(env, "scontrol", "update", f"JobId={first_job_id}", f"TimeLimit={limit_minutes}")

    # The second job, the chain's last: once it has saved a checkpoint of its own and trained a
    # step past it, rank 1 is killed. Were the job not requeued, the run would end there.
    def second_task_past_its_first_save():
        row = task(2)
        if row is None or row[2] != "RUNNING":
            return None
        first_log = (logs / f"cpu-tiny-{first_job_id}.out").read_bytes().decode(errors="replace")
        stop = re.search(r"stopping at iteration (\d+)/\d+: received SIGUSR1", first_log)
        assert stop, f"the first job ended without stopping on SIGUSR1:\n{first_log[-3000:]}"
        saved = latest_step(checkpoints)
        if saved <= int(stop.group(1)) or max(train_losses(run_dir)) <= saved:
            return None
        ranks = job_ranks(env, row[1])
        return (row[1], saved, ranks[1]) if sorted(ranks) == [0, 1] else None

    second_job_id, saved, victim = wait_until(second_task_past_its_first_save, CHAIN_TIMEOUT_S,
                                              f"job {array_id}_2 to save a checkpoint and train on", period=0.5)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    # The killed run is over once the job is requeued (its batch script does that after srun returns).
    # (By its task id: the array's last task has the array's own job id, which names every task.)
    wait_until(lambda: int(job_records(env, f"{array_id}_2")[0]["Restarts"]) >= 1, 120,
               f"job {array_id}_2 to requeue itself after its rank 1 was killed")
    progress = max(train_losses(run_dir))  # the last step the killed run logged

    wait_until(lambda: not slurm(env, "squeue", "-h", "-r", f"--jobs={array_id}").strip(), CHAIN_TIMEOUT_S,
               f"the chain {array_id} to finish")
    print(f"job {second_job_id}: rank 1 killed after step {progress}; the requeued run finished "
          f"{time.monotonic() - killed_at:.0f} s later")
    first, second = job_records(env, array_id)
    # Progress bars and two ranks share the log: read it as bytes, tolerate split characters.
    first_log, second_log = ((logs / f"cpu-tiny-{r['JobId']}.out").read_bytes().decode(errors="replace")
                             for r in (first, second))

    # Job 1: stopped by SIGUSR1, saved, exited 0 before its limit (not TIMEOUT).
    assert (first["JobState"], first["ExitCode"], first["Restarts"]) == ("COMPLETED", "0:0", "0"), first_log[-3000:]
    stop = re.search(r"stopping at iteration (\d+)/\d+: received SIGUSR1", first_log)
    assert stop, f"the first job did not stop on SIGUSR1 (did it arrive after the last step?):\n{first_log[-3000:]}"
    stopped_at = int(stop.group(1))
    assert 3 <= stopped_at < saved < progress < STEPS
    # The time left (--time=10, in whole minutes: 9 once a second has passed) minus cpu-tiny's 1-minute margin.
    left = int(re.search(r"(\d+) minute\(s\) left", first_log).group(1))
    assert left in (9, 10) and f"training.exit_duration_in_mins={left - 1}" in first_log
    # Job 2 started after job 1 ended (%1) and resumed from its checkpoint; it lost rank 1,
    # requeued itself once (its log, appended to, holds both runs) and the second run resumed
    # from the newest complete checkpoint, losing at most SAVE_INTERVAL steps, and finished.
    assert second["JobId"] == second_job_id
    assert (second["JobState"], second["ExitCode"], second["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        second_log[-3000:]
    assert second["StartTime"] >= first["EndTime"]
    assert f"requeueing job {array_id}_2 (1 of at most 3)" in second_log, second_log[-3000:]
    resumed = [int(m.group(1)) if m.group(1) else 0 for m in RESUMED.finditer(second_log)]
    assert resumed == [stopped_at, saved], second_log[-3000:]
    assert progress - saved <= SAVE_INTERVAL
    assert (checkpoints / "latest").read_text().strip() == f"global_step{STEPS}"

    # Every loss logged, by every run (the steps the killed run logged after its last save were
    # logged again), equals the uninterrupted run's for its step exactly.
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, filter(str.strip, lines)) if r["kind"] == "train"]
    assert {r["step"] for r in records} == set(range(1, STEPS + 1))
    assert len(records) == STEPS + progress - saved
    differing = [(r["step"], r["lm loss"], reference[r["step"]]) for r in records
                 if r["lm loss"] != reference[r["step"]]]
    assert not differing, f"(step, loss, uninterrupted loss) that differ: {differing}"

    status = subprocess.run([sys.executable, "scripts/run_status.py", str(run_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=120, env=env)
    assert status.returncode == 0, status.stderr
    assert f"global_step{STEPS} (complete)" in status.stdout
    assert f"step           {STEPS} of {STEPS} (100.0%)" in status.stdout


def test_dependency_chain_runs_jobs_one_after_another(cluster, tmp_path):
    script = tmp_path / "hello.slurm"
    script.write_text("#!/usr/bin/env bash\n#SBATCH --time=1\nset -euo pipefail\nsleep 5\necho \"done $SLURM_JOB_ID\"\n")
    submitted = subprocess.run(
        ["bash", "scripts/submit_chain.sh", "--dependency", "2", str(script), f"--output={tmp_path}/%j.out"],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=cluster)
    assert submitted.returncode == 0, submitted.stderr
    first_id, second_id = submitted.stdout.split()
    assert f"afterany:{first_id}" in slurm(cluster, "scontrol", "-o", "show", "job", second_id)
    wait_until(lambda: not slurm(cluster, "squeue", "-h", f"--jobs={first_id},{second_id}").strip(), 120,
               "the dependency chain to finish")
    (first,), (second,) = job_records(cluster, first_id), job_records(cluster, second_id)
    assert first["JobState"] == second["JobState"] == "COMPLETED"
    assert second["StartTime"] >= first["EndTime"]
    assert (tmp_path / f"{second_id}.out").read_text().strip() == f"done {second_id}"
