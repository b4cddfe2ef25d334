"""What a user reads when stdout is a file (a SLURM log, ``| tee``): Megatron-style step lines that
arrive while the run goes on, the chosen precision, one summary line for the blend, no DeepSpeed
memory chatter, no progress bars."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import yaml

from conftest import REPO
from launch import kill_group
from megatron.training.logging import read_metrics
from training_utils import tiny_run


def test_log_lines_reach_a_redirected_stdout_while_the_run_goes_on(corpus, tmp_path):
    switch = tmp_path / "stop"
    body = tiny_run(tmp_path, corpus, training={"train_iters": 100_000, "kill_switch_path": str(switch)},
                    logging={"eval_interval": 0})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(body))
    out_path, err_path = tmp_path / "stdout.log", tmp_path / "stderr.log"
    # As in a batch job: stdout block-buffered unless the program flushes.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["OMP_NUM_THREADS"] = "1"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        process = subprocess.Popen([sys.executable, "pretrain_bloom.py", "--config", str(config)], cwd=REPO,
                                   stdout=out, stderr=err, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while " iteration        2/" not in out_path.read_text() and time.monotonic() < deadline:
                assert process.poll() is None, f"the run ended early:\n{err_path.read_text()[-3000:]}"
                time.sleep(0.2)
            # Seen in the file while the process still trains (it runs until the kill switch), and
            # as soon as it is logged: metrics.jsonl (flushed per record) is at most one step ahead.
            # A block-buffered stdout would hold ~40 such lines back.
            logged = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
            printed = [line for line in out_path.read_text().splitlines() if line.startswith(" iteration ")]
            assert process.poll() is None, err_path.read_text()[-3000:]
            assert len(printed) >= len(logged) - 1, (len(printed), len(logged))
            switch.touch()
            assert process.wait(timeout=120) == 0, err_path.read_text()[-3000:]
        finally:
            if process.poll() is None:
                kill_group(process)
    stdout, stderr = out_path.read_text(), err_path.read_text()
    step_lines = [line for line in stdout.splitlines() if line.startswith(" iteration ")]
    # Megatron-DeepSpeed's line, as in BLOOM's logs.
    assert step_lines[0].startswith(" iteration        1/  100000 | consumed samples:            8 | consumed tokens: ")
    assert " | lm loss: " in step_lines[0] and " | number of skipped iterations:   0 |" in step_lines[0]
    assert "precision: fp32 (training.bf16 is false)" in stderr
    assert "blend: 3 datasets" in stderr and "documents train/valid/test" not in stderr  # a summary, not a line per language
    for chatter in ("MA ", "Max_MA", "before initializing group", "DeepSpeed Flops"):
        assert chatter not in stdout + stderr, chatter
    assert "\r" not in stdout + stderr  # no progress bar off a terminal
    assert "stopping at iteration" in stdout
