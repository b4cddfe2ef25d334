"""The local SLURM cluster of the SLURM tiers, and what their tests read from it.

``start_cluster`` starts scripts/slurm_cluster.sh (one node, or two as network namespaces) and
stops it whatever happens; ``slurm`` runs a client command where the controller is reachable;
the rest reads jobs (``scontrol``), their processes (``/proc``) and their runs (metrics and
checkpoints). Used by tests/test_slurm.py and tests/test_slurm_two_nodes.py.
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
from typing import Iterator, Optional

import pytest

from conftest import REPO
from faults.harness import children_of
from launch import run_command
from megatron.training.logging import read_metrics

SCRIPT = REPO / "scripts" / "slurm_cluster.sh"


def start_cluster(request, make_target: str, two_nodes: Optional[str] = None) -> Iterator[dict[str, str]]:
    """Start the cluster (``two_nodes``: the namespace pair's ID, else one node); yield the
    environment its clients need; stop it whatever happens. Use with ``yield from`` in a fixture."""
    if "slurm" not in (request.config.getoption("markexpr") or ""):
        pytest.skip(f"the SLURM tier installs and starts SLURM daemons: run it with `{make_target}` (pytest -m slurm)")
    # Not under pytest's private (0700) tmp root: munged runs as the munge user and must reach it.
    state = Path(tempfile.mkdtemp(prefix="bloom-slurm-"))
    state.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(SLURM_CONF=str(state / "slurm.conf"), OMP_NUM_THREADS="1")
    command = ["start-two", two_nodes, str(state)] if two_nodes else ["start", str(state)]
    started = subprocess.run(["bash", str(SCRIPT), *command], capture_output=True, text=True, timeout=600, env=env)
    try:
        if started.returncode == 3:
            # CI runs this tier to prove the SLURM path: a skip there would hide that it was not.
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI=true and no SLURM cluster could be started: {started.stderr.strip()}")
            pytest.skip(f"no SLURM cluster on this machine: {started.stderr.strip()}")
        assert started.returncode == 0, f"could not start SLURM:\n{started.stdout}\n{started.stderr}"
        yield env
    finally:
        stopped = subprocess.run(["bash", str(SCRIPT), "stop", str(state)], capture_output=True, text=True,
                                 timeout=180, env=env)
        print(stopped.stdout, stopped.stderr, file=sys.stderr)
        if stopped.returncode == 0:
            shutil.rmtree(state, ignore_errors=True)
        assert stopped.returncode == 0, f"could not stop SLURM:\n{stopped.stdout}\n{stopped.stderr}"


def slurm(env: dict[str, str], *args: str) -> str:
    """Run a SLURM client command against the test cluster (from the repository root, where the
    scripts are submitted from); return its stdout."""
    cluster_dir = str(Path(env["SLURM_CONF"]).parent)
    result = subprocess.run(["bash", str(SCRIPT), "client", cluster_dir, *args], capture_output=True, text=True,
                            timeout=60, env=env, cwd=REPO)
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


def tiny_overrides(root: Path, corpus, steps: int, save_interval: Optional[int]) -> list[str]:
    """``--set`` arguments: the tiny config on the synthetic corpus, ``steps`` steps, everything under ``root``."""
    datasets = ", ".join(f"{{name: {d['name']}, prefix: {d['prefix']}}}" for d in corpus)
    sets = [
        f"data.datasets=[{datasets}]", "data.datasets_file=null", "data.tokenizer=null", "training.train_samples=null",
        # fp32 whatever the CPU: the tests compare losses bit for bit, an fp32 invariant. Steps
        # of a fixed size, whatever the demo's schedule: the signal's timing depends on them.
        f"training.train_iters={steps}", "training.bf16=false", "training.micro_batch_size=4",
        "training.global_batch_size=8", "model.seq_length=256", "logging.log_interval=1", "logging.eval_interval=0",
        "logging.sample_prompts=[]", f"logging.run_dir={root / 'run'}", "logging.tensorboard_dir=null",
        f"checkpoint.save={root / 'checkpoints'}", f"checkpoint.load={root / 'checkpoints'}",
        f"checkpoint.save_interval={save_interval or 'null'}", f"training.kill_switch_path={root / 'kill-switch'}",
    ]
    return [arg for item in sets for arg in ("--set", item)]


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss in ``run_dir``'s metrics.jsonl (a step logged again: the last)."""
    return {r["step"]: r["lm loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}


def latest_step(checkpoints: Path) -> int:
    """The step of the checkpoint ``latest`` names (written once the checkpoint is complete); 0 if none."""
    try:
        return int((checkpoints / "latest").read_text().strip().removeprefix("global_step"))
    except FileNotFoundError:
        return 0


def job_ranks(env: dict[str, str], job_id: str) -> dict[int, int]:
    """Global rank -> pid of a running job's training processes: the children of its torchrun
    agents (one per node), found by the job id and cluster SLURM put in their environment."""
    wanted = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_CONF={env['SLURM_CONF']}".encode()}
    ranks = {}
    for entry in Path("/proc").iterdir():
        try:
            environ = set((entry / "environ").read_bytes().split(b"\0"))
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # not a process, or one that has just ended
            continue
        if not (wanted <= environ and b"torch.distributed.run" in cmdline):
            continue
        for pid in children_of(int(entry.name)):
            try:
                variables = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            rank = next((int(v[5:]) for v in variables if v.startswith(b"RANK=")), None)
            if rank is not None:
                ranks[rank] = pid
    return ranks


def reference_losses(root: Path, overrides: list[str], steps: int, env: dict[str, str]) -> dict[int, float]:
    """Losses of the same training as two ranks of one torchrun on this machine (no SLURM, no
    namespaces): what the jobs of a tier must reproduce bit for bit."""
    cmd = [str(REPO / ".venv" / "bin" / "python"), "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node=2", "pretrain_bloom.py", "--config", "configs/tiny.yaml", *overrides]
    result = run_command(cmd, timeout=600, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = train_losses(root / "run")
    assert sorted(losses) == list(range(1, steps + 1))
    assert all(math.isfinite(v) for v in losses.values())
    return losses
