"""Faults met by real runs of pretrain_bloom.py (the fault tier: make test-faults):

* a checkpoint save on a file system that fills up: the run stops with a message naming the
  directory and the bytes needed, or (checkpoint.on_save_failure: continue) trains on and saves
  at the next interval once there is room; the previous checkpoint stays complete and the run
  resumes from it exactly;
* a second run on the checkpoint directory of a live one is refused; once the first is killed
  (SIGKILL: nothing of it runs any more), the directory is free.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import REPO
from megatron.checkpoint.lock import CheckpointLock
from megatron.checkpoint.store import verify_checkpoint
from training_utils import synthetic_corpus, tiny_run

pytestmark = [pytest.mark.slow, pytest.mark.faults,
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="needs root to mount tmpfs")]


def write_config(tmp: Path, name: str, corpus, checkpoints: Path, **checkpoint) -> Path:
    body = tiny_run(tmp, corpus, training={"train_iters": checkpoint.pop("train_iters")},
                    checkpoint={"save": str(checkpoints), "load": str(checkpoints), "keep_last": 1, **checkpoint},
                    logging={"run_dir": str(tmp / name), "eval_interval": 0})
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


def start(config: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(REPO / "pretrain_bloom.py"), "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run(config: Path, timeout: float = 300) -> tuple[int, str]:
    process = start(config)
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lm loss"] for r in records if r["kind"] == "train"}


@pytest.fixture
def tmpfs(tmp_path):
    """A tmpfs of 64 MiB; ``remount(bytes)`` resizes it (tmpfs takes any size >= what it holds)."""
    mountpoint = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mountpoint)], check=True)

    def remount(size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mountpoint)], check=True)

    try:
        yield mountpoint, remount
    finally:
        if subprocess.run(["umount", str(mountpoint)]).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)


def test_a_full_disk_stops_or_continues_and_loses_nothing(tmp_path, tmpfs):
    disk, remount = tmpfs
    checkpoints = disk / "checkpoints"
    corpus = synthetic_corpus(tmp_path / "corpus")
    status, out = run(write_config(tmp_path, "first", corpus, checkpoints, train_iters=3, save_interval=3))
    assert status == 0, out
    size = sum(f.stat().st_size for f in (checkpoints / "global_step3").iterdir())
    used = shutil.disk_usage(disk).used
    remount(used + size // 2)  # room for half a checkpoint more

    # stop: the run ends non-zero with the message, global_step3 stays complete. (Both runs have the
    # same train_iters: the learning-rate schedule depends on it.)
    status, out = run(write_config(tmp_path, "stop", corpus, checkpoints, train_iters=12, save_interval=3))
    assert status != 0
    assert f"saving checkpoint {checkpoints / 'global_step6'} failed" in out and "bytes are free" in out
    assert f"{checkpoints / 'global_step3'}, is intact" in out and "Traceback" not in out
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("global_step")) == ["global_step3"]
    assert verify_checkpoint(checkpoints / "global_step3", "full") == []
    stopped = losses(tmp_path / "stop")

    # continue: the save at step 6 fails, training goes on; with room again, step 9 is saved.
    process = start(write_config(tmp_path, "continue", corpus, checkpoints, train_iters=12, save_interval=3,
                                 on_save_failure="continue"))
    out = []
    for line in process.stdout:
        out.append(line)
        if "continuing (checkpoint.on_save_failure: continue)" in line:
            remount(64 << 20)
    process.wait(timeout=300)
    out = "".join(out)
    assert process.returncode == 0, out
    assert "resuming from checkpoint" in out and "(iteration 3)" in out
    assert f"saving checkpoint {checkpoints / 'global_step6'} failed" in out
    continued = losses(tmp_path / "continue")
    assert {s: continued[s] for s in (4, 5, 6)} == {s: stopped[s] for s in (4, 5, 6)}  # resumed bit for bit
    assert sorted(continued) == list(range(4, 13))
    assert verify_checkpoint(checkpoints / "global_step12", "full") == []


def test_a_second_run_on_a_live_runs_checkpoint_directory_is_refused(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    corpus = synthetic_corpus(tmp_path / "corpus")
    first = start(write_config(tmp_path, "first", corpus, checkpoints, train_iters=100000, save_interval=1000))
    try:
        for line in first.stdout:  # the first step is logged once the lock is held and training runs
            if "iteration" in line and "consumed samples" in line:
                break
        status, out = run(write_config(tmp_path, "second", corpus, checkpoints, train_iters=3, save_interval=3))
        assert status != 0
        assert f"checkpoint directory {checkpoints} is in use by another run (pid {first.pid} on host" in out
        assert "Traceback" not in out
        assert not (tmp_path / "second" / "metrics.jsonl").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with CheckpointLock(checkpoints):  # the killed run holds nothing: the next run may start
        pass
