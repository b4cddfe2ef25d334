"""``torchrun`` and the ``deepspeed`` launcher both start a TP=2 run of pretrain_bloom.py on CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from launch import run_command
from training_utils import synthetic_corpus, tiny_run, train_losses

pytestmark = pytest.mark.distributed
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launch")
    body = tiny_run(tmp, synthetic_corpus(tmp / "corpus"), parallel={"tensor_model_parallel_size": 2},
                    training={"train_iters": 3}, logging={"eval_interval": 0})
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def launch(launcher: list[str], config: Path, run_dir: Path) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [str(BIN / launcher[0]), *launcher[1:], "pretrain_bloom.py", "--config", str(config),
               "--set", f"logging.run_dir={run_dir}"]
    result = run_command(command, timeout=300, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return train_losses(run_dir)


def test_torchrun_and_deepspeed_launchers_give_the_same_run(run_config, tmp_path):
    with_torchrun = launch(["torchrun", "--nproc_per_node", "2"], run_config, tmp_path / "torchrun")
    with_deepspeed = launch(["deepspeed", "--num_gpus", "2"], run_config, tmp_path / "deepspeed")
    assert len(with_torchrun) == 3
    assert with_torchrun == with_deepspeed
