"""The run's lifecycle: SIGTERM, the kill switch and the time limit make a run save and exit
cleanly (status 0) at the next step; skipped iteration ranges consume their data untrained."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from launch import run_ranks
from megatron.checkpoint.store import verify_checkpoint
from megatron.config import TrainingConfig, config_from_dict
from megatron.training.lifecycle import RunLifecycle, job_start_time
from megatron.training.logging import read_metrics
from training_utils import tiny_run

GRACE_SECONDS = 60  # what a scheduler would allow between SIGTERM and SIGKILL (SLURM's KillWait)

# -- the object alone ---------------------------------------------------------------------------------


def test_skip_ranges_are_inclusive():
    lifecycle = RunLifecycle(TrainingConfig(skip_train_iteration_range=["3-4", "10-10"]), time.time())
    assert [i for i in range(1, 12) if lifecycle.skips(i)] == [3, 4, 10]


def test_exit_interval_and_duration():
    now = [100.0]
    lifecycle = RunLifecycle(TrainingConfig(exit_interval=5, exit_duration_in_mins=1.0), start_time=100.0,
                             clock=lambda: now[0])
    lifecycle.begin(5)  # resumed at iteration 5: no stop there
    assert lifecycle.check(5) is None and lifecycle.check(7) is None
    assert lifecycle.check(10) == "training.exit_interval=5 reached"
    now[0] = 161.0
    assert "training.exit_duration_in_mins=1 reached" in lifecycle.check(11)
    assert lifecycle.check_before_start() is None  # time limits count only after a step


def test_a_malformed_slurm_start_time_is_reported(monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_START_TIME", "1700000000")
    assert job_start_time() == 1700000000.0
    monkeypatch.setenv("SLURM_JOB_START_TIME", "yesterday")
    with caplog.at_level("WARNING", logger="megatron.training.lifecycle"):
        assert abs(job_start_time() - time.time()) < 5
    assert "SLURM_JOB_START_TIME='yesterday' is not a Unix time" in caplog.text


def test_kill_switch(tmp_path):
    switch = tmp_path / "stop-now"
    lifecycle = RunLifecycle(TrainingConfig(kill_switch_path=str(switch)), time.time())
    assert lifecycle.check(1) is None
    switch.touch()
    assert lifecycle.check(2).startswith(f"kill switch {switch} exists")
    assert lifecycle.check_before_start() is not None


def test_signal_handler_only_sets_a_flag():
    lifecycle = RunLifecycle(TrainingConfig(), time.time())
    before = signal.getsignal(signal.SIGUSR1)
    with lifecycle.handling_signals():
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert lifecycle.received_signal == signal.SIGUSR1
        assert lifecycle.check(1) == "received SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def _loader_worker(ready) -> None:
    from megatron.training.data import ignore_stop_signals

    ignore_stop_signals(0)
    ready.set()
    time.sleep(60)


def test_data_loader_workers_survive_the_signals_meant_for_the_run():
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    process = context.Process(target=_loader_worker, args=(ready,), daemon=True)
    process.start()
    try:
        assert ready.wait(60)
        os.kill(process.pid, signal.SIGTERM)
        os.kill(process.pid, signal.SIGUSR1)
        process.join(0.5)
        assert process.is_alive()
    finally:
        process.kill()
        process.join()


# -- training runs ----------------------------------------------------------------------------------


def train_worker(rank: int, body: dict, pid_dir: str = "") -> dict:
    from megatron.training.pretrain import pretrain

    if pid_dir:
        Path(pid_dir, f"rank{rank}.pid").write_text(str(os.getpid()))
    state = pretrain(config_from_dict(body))
    return {"iteration": state.iteration, "consumed": state.consumed_samples}


def console(capfd) -> str:
    """What the ranks printed (log messages go to stderr, the trainer's lines to stdout)."""
    captured = capfd.readouterr()
    return captured.out + captured.err


def train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [r for r in read_metrics(path) if r["kind"] == "train"] if path.exists() else []


def run_in_background(fn, *args):
    """Start ``run_ranks`` in a thread; returns (thread, box) where box gets the result or error."""
    box: dict = {}

    def target():
        try:
            box["result"] = run_ranks(fn, *args)
        except BaseException as exc:  # reported by the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def wait_for_steps(run_dir: Path, steps: int, thread: threading.Thread, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while len(train_records(run_dir)) < steps:
        assert thread.is_alive(), "the run ended before it was interrupted"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.2)


def long_run(tmp: Path, corpus, **training) -> dict:
    return tiny_run(tmp, corpus, training={"train_iters": 2000, **training},
                    checkpoint={"save": str(tmp / "checkpoints"), "load": str(tmp / "checkpoints"),
                                "save_interval": 1000},
                    logging={"eval_interval": 0})


def assert_saved_at(tmp: Path, iteration: int) -> None:
    checkpoints = tmp / "checkpoints"
    assert (checkpoints / "latest").read_text() == f"global_step{iteration}"
    assert verify_checkpoint(checkpoints / f"global_step{iteration}") == []


@pytest.mark.distributed
def test_sigterm_to_one_rank_saves_and_exits_cleanly(corpus, tmp_path, capfd):
    pids = tmp_path / "pids"
    pids.mkdir()
    thread, box = run_in_background(train_worker, 2, (long_run(tmp_path, corpus), str(pids)))
    wait_for_steps(tmp_path / "run", 3, thread)
    # Only rank 1 is signalled: the all-reduced flag must stop rank 0 at the same step.
    os.kill(int((pids / "rank1.pid").read_text()), signal.SIGTERM)
    signalled = time.monotonic()
    thread.join(GRACE_SECONDS)
    assert not thread.is_alive(), f"no exit within {GRACE_SECONDS} s of SIGTERM"
    assert "error" not in box, box.get("error")  # every rank returned: clean exit, status 0
    results = box["result"]
    stopped = results[0]["iteration"]
    assert results[1] == results[0] and 3 <= stopped < 2000
    assert_saved_at(tmp_path, stopped)
    err = console(capfd)
    assert f"stopping at iteration {stopped}/2000: received SIGTERM" in err
    print(f"SIGTERM to exit: {time.monotonic() - signalled:.1f} s")


@pytest.mark.distributed
def test_kill_switch_saves_and_exits_and_blocks_restarts(corpus, tmp_path, capfd):
    switch = tmp_path / "kill-switch"
    body = long_run(tmp_path, corpus, kill_switch_path=str(switch))
    thread, box = run_in_background(train_worker, 1, (body,))
    wait_for_steps(tmp_path / "run", 2, thread)
    switch.touch()
    thread.join(GRACE_SECONDS)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    (result,) = box["result"]
    assert 2 <= result["iteration"] < 2000
    assert_saved_at(tmp_path, result["iteration"])
    assert "kill switch" in console(capfd)
    # A restart (a requeued job) finds the switch, loads, and stops before training.
    (again,) = run_ranks(train_worker, 1, (body,))
    assert again == result
    assert "not training: kill switch" in console(capfd)


@pytest.mark.distributed
def test_exit_duration_saves_and_exits(corpus, tmp_path, capfd):
    body = long_run(tmp_path, corpus, exit_duration_in_mins=0.001)
    (result,) = run_ranks(train_worker, 1, (body,))
    assert result["iteration"] == 1  # start-up alone outlasts the limit: stop after the first step
    assert_saved_at(tmp_path, 1)
    assert "training.exit_duration_in_mins=0.001 reached" in console(capfd)


def recording_worker(rank: int, body: dict) -> dict:
    """Train, recording a fingerprint of every micro-batch that reaches the model."""
    from megatron.training import steps
    from megatron.training.pretrain import pretrain

    seen = []
    original = steps.EngineSteps._loss

    def loss(self, batch):
        seen.append(int(batch["text"].sum()))
        return original(self, batch)

    steps.EngineSteps._loss = loss
    updates = {}
    state = pretrain(config_from_dict(body), on_finish=lambda engine, parallel: updates.update(n=engine.global_steps))
    return {"batches": seen, "updates": updates["n"], "consumed": state.consumed_samples,
            "data_skipped": state.data_skipped_iterations}


@pytest.mark.distributed
def test_skipped_iterations_consume_their_data_without_training(corpus, tmp_path):
    def body(name, **training):
        return tiny_run(tmp_path / name, corpus, training={"train_iters": 6, **training}, logging={"eval_interval": 0})

    (plain,) = run_ranks(recording_worker, 1, (body("plain"),))
    (skipping,) = run_ranks(recording_worker, 1, (body("skipping", skip_train_iteration_range=["2-3"]),))
    per_step = 4  # global batch 8 / micro-batch 2
    assert skipping["consumed"] == plain["consumed"] == 48
    assert skipping["updates"] == 4 and plain["updates"] == 6 and skipping["data_skipped"] == 2
    # Steps 1, 4, 5, 6 see exactly the micro-batches the plain run saw at those steps.
    expected = plain["batches"][:per_step] + plain["batches"][3 * per_step:]
    assert skipping["batches"] == expected
    records = train_records(tmp_path / "skipping" / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    plain_records = train_records(tmp_path / "plain" / "run")
    # The schedule follows consumed samples, so step 4's learning rate is the plain run's.
    assert records[3]["learning-rate"] == plain_records[3]["learning-rate"]
