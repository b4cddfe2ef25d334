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
   next step boundary and exit 0 before the limit; the second job resumes from ``latest`` and
   finishes; every logged step's loss equals the reference exactly;
3. a ``--dependency=afterany`` chain runs its jobs one after the other.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO
from launch import run_command
from megatron.training.logging import read_metrics

pytestmark = pytest.mark.slurm

# ~0.85 s each on two AVX2 cores in fp32 (two ranks of 4 x 256 tokens): after the time limit is
# cut at step 3 the signal needs up to ~30 s (slurmctld's time-limit pass runs every 30 s), so
# the first job is still training when it lands.
STEPS = 80
SIGNAL_LEAD_S = 120  # --signal=USR1@120 for the chain (the script's own header says @60)
START_TIMEOUT_S = 240
CHAIN_TIMEOUT_S = 420


# -- the cluster -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory):
    """Start the local cluster; yield the environment its clients need; stop it whatever happens."""
    if "slurm" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the SLURM tier installs and starts SLURM daemons: run it with `make test-slurm` "
                    "(pytest -m slurm)")
    # Not under pytest's private (0700) tmp root: munged runs as the munge user and must reach it.
    state = Path(tempfile.mkdtemp(prefix="bloom-slurm-"))
    state.chmod(0o755)
    script = REPO / "scripts" / "slurm_cluster.sh"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(SLURM_CONF=str(state / "slurm.conf"), OMP_NUM_THREADS="1")
    started = subprocess.run(["bash", str(script), "start", str(state)], capture_output=True, text=True,
                             timeout=600, env=env)
    try:
        if started.returncode == 3:
            # CI runs this tier to prove the SLURM path: a skip there would hide that it was not.
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI=true and no SLURM cluster could be started: {started.stderr.strip()}")
            pytest.skip(f"no SLURM cluster on this machine: {started.stderr.strip()}")
        assert started.returncode == 0, f"could not start SLURM:\n{started.stdout}\n{started.stderr}"
        yield env
    finally:
        stopped = subprocess.run(["bash", str(script), "stop", str(state)], capture_output=True, text=True,
                                 timeout=120, env=env)
        print(stopped.stdout, stopped.stderr, file=sys.stderr)
        if stopped.returncode == 0:
            shutil.rmtree(state, ignore_errors=True)


def slurm(env: dict[str, str], *args: str) -> str:
    """Run a SLURM client command against the test cluster; return its stdout."""
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, f"{' '.join(args)} failed: {result.stderr}"
    return result.stdout


def job_records(env: dict[str, str], job_id: str) -> list[dict[str, str]]:
    """``scontrol -o show job`` as dicts, one per job (per task for an array)."""
    records = []
    for line in slurm(env, "scontrol", "-o", "show", "job", job_id).splitlines():
        records.append(dict(re.findall(r"(\w+)=(\S*)", line)))
    return sorted(records, key=lambda r: int(r.get("ArrayTaskId") or 0))


def wait_until(condition, timeout: float, what: str, period: float = 1.0):
    """Poll ``condition()`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(period)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def seconds(duration: str) -> int:
    """``[D-]H:MM:SS`` / ``M:SS`` (squeue's %M) in seconds."""
    days, _, rest = duration.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + s


# -- the run -----------------------------------------------------------------------------------


def overrides(root: Path, corpus) -> list[str]:
    """The tiny config on the synthetic corpus, a fixed number of steps, everything under ``root``."""
    datasets = ", ".join(f"{{name: {d['name']}, prefix: {d['prefix']}}}" for d in corpus)
    sets = [
        f"data.datasets=[{datasets}]", "data.datasets_file=null", "data.tokenizer=null", "training.train_samples=null",
        # fp32 whatever the CPU: the test compares losses bit for bit, an fp32 invariant. Steps
        # of a fixed size, whatever the demo's schedule: the signal's timing depends on them.
        f"training.train_iters={STEPS}", "training.bf16=false", "training.micro_batch_size=4",
        "training.global_batch_size=8", "model.seq_length=256", "logging.log_interval=1", "logging.eval_interval=0",
        "logging.sample_prompts=[]", f"logging.run_dir={root / 'run'}", "logging.tensorboard_dir=null",
        f"checkpoint.save={root / 'checkpoints'}", f"checkpoint.load={root / 'checkpoints'}",
        "checkpoint.save_interval=null", f"training.kill_switch_path={root / 'kill-switch'}",
    ]
    return [arg for item in sets for arg in ("--set", item)]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lm loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}


@pytest.fixture(scope="module")
def reference(cluster, corpus, tmp_path_factory):
    """Losses of the uninterrupted run, started with torchrun directly (no SLURM)."""
    root = tmp_path_factory.mktemp("reference")
    cmd = [str(REPO / ".venv" / "bin" / "python"), "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node=2", "pretrain_bloom.py", "--config", "configs/tiny.yaml", *overrides(root, corpus)]
    result = run_command(cmd, timeout=600, cwd=REPO, env=cluster)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = train_losses(root / "run")
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in losses.values())
    return losses


def test_chain_stops_on_usr1_before_the_limit_and_resumes_exactly(cluster, corpus, reference, tmp_path):
    env = dict(cluster, BLOOM_LOG_DIR=str(tmp_path / "logs"))
    logs = tmp_path / "slurm-logs"
    logs.mkdir()
    submitted = subprocess.run(
        ["bash", "scripts/submit_chain.sh", "2", "slurm/cpu-tiny.slurm", "--time=10",
         f"--signal=USR1@{SIGNAL_LEAD_S}", f"--output={logs}/%x-%j.out", "--", *overrides(tmp_path, corpus)],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert submitted.returncode == 0, submitted.stderr
    array_id = submitted.stdout.split()[0]

    def first_task():
        rows = [line.split("|") for line in slurm(env, "squeue", "-h", "-r", f"--jobs={array_id}",
                                                    "-o", "%i|%A|%T|%M").splitlines()]
        return next((row for row in rows if row[0] == f"{array_id}_1"), None)

    def first_task_training():
        metrics = tmp_path / "run" / "metrics.jsonl"
        task = first_task()
        if task is None:
            raise AssertionError(f"job {array_id}_1 ended before it was signalled: {job_records(env, array_id)}")
        return task if metrics.is_file() and len(train_losses(tmp_path / "run")) >= 3 else None

    task = wait_until(first_task_training, START_TIMEOUT_S, f"job {array_id}_1 to train a few steps")
    first_job_id = task[1]
    # Cut the time limit to 75-135 s from now (SLURM counts limits in whole minutes). slurmctld
    # sends --signal's USR1 at its first time-limit pass (every 30 s) that finds the job within
    # SIGNAL_LEAD_S (+ up to one pass) of its limit: that is the next pass, and the save has a
    # minute or more before the limit.
    elapsed = seconds(slurm(env, "squeue", "-h", f"--jobs={first_job_id}", "-o", "%M").strip())
    limit_minutes = math.ceil((elapsed + 75) / 60)
    slurm(env, "scontrol", "update", f"JobId={first_job_id}", f"TimeLimit={limit_minutes}")

    wait_until(lambda: not slurm(env, "squeue", "-h", "-r", f"--jobs={array_id}").strip(), CHAIN_TIMEOUT_S,
               f"the chain {array_id} to finish")
    first, second = job_records(env, array_id)
    # Progress bars and two ranks share the log: read it as bytes, tolerate split characters.
    first_log, second_log = ((logs / f"cpu-tiny-{r['JobId']}.out").read_bytes().decode(errors="replace")
                             for r in (first, second))

    # Job 1: stopped by SIGUSR1, saved, exited 0 before its limit (not TIMEOUT).
    assert (first["JobState"], first["ExitCode"]) == ("COMPLETED", "0:0"), first_log[-3000:]
    stop = re.search(r"stopping at iteration (\d+)/\d+: received SIGUSR1", first_log)
    assert stop, f"the first job did not stop on SIGUSR1 (did it arrive after the last step?):\n{first_log[-3000:]}"
    stopped_at = int(stop.group(1))
    assert 3 <= stopped_at < STEPS
    assert "training.exit_duration_in_mins=9" in first_log  # --time=10 minus cpu-tiny's 1-minute margin
    # Job 2 started after job 1 ended (%1), resumed from its checkpoint and finished the run.
    assert (second["JobState"], second["ExitCode"]) == ("COMPLETED", "0:0"), second_log[-3000:]
    assert second["StartTime"] >= first["EndTime"]
    assert f"global_step{stopped_at}" in second_log  # where it resumed from
    tags = sorted(p.name for p in (tmp_path / "checkpoints").glob("global_step*"))
    assert tags == sorted([f"global_step{stopped_at}", f"global_step{STEPS}"])
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"global_step{STEPS}"

    # The losses continue the uninterrupted curve exactly, step by step.
    losses = train_losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, STEPS + 1))
    differing = {step: (losses[step], reference[step]) for step in losses if losses[step] != reference[step]}
    assert not differing, f"steps whose loss differs from the uninterrupted run: {differing}"

    status = subprocess.run([sys.executable, "scripts/run_status.py", str(tmp_path / "run")], cwd=REPO,
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
