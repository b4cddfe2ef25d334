"""environment.json (what a run ran on), its display by scripts/run_status.py, and the permissions
and durability of the files written atomically (config.yaml, environment.json, layer files, ``latest``)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, REPO
from megatron.checkpoint.store import write_latest
from megatron.config import load_config, save_config
from megatron.training.environment import (
    ENVIRONMENT_FILE,
    describe_environment,
    git_state,
    host_allocator,
    read_environment,
    write_environment,
)
from megatron.utils.atomic import atomic_path, atomic_write_text

LAYOUT = {"tp": 1, "pp": 1, "dp": 2, "zero_stage": 1}
REASON = "training.bf16 is auto and this CPU has no native bf16"


@pytest.fixture
def umask_022():
    """The usual umask, whatever the machine running the tests has; restored afterwards."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def cfg(tmp_path):
    return load_config(CONFIGS / "tiny.yaml", [f"logging.run_dir={tmp_path / 'run'}",
                                               f"checkpoint.save={tmp_path / 'ckpt'}", "training.train_samples=160"])


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def run_status_module():
    """scripts/run_status.py imported in this process (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("run_status", REPO / "scripts" / "run_status.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_record_has_every_field_with_its_type(cfg):
    record = describe_environment(cfg, 2, LAYOUT, torch.device("cpu"), "fp32", REASON)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", record["written_at"])
    assert isinstance(record["hostname"], str) and record["command"] == sys.argv
    packages = record["packages"]
    assert set(packages) == {"python", "torch", "cuda", "deepspeed", "tokenizers", "datasets", "transformers",
                             "numpy", "safetensors", "pyyaml", "tensorboard"}
    assert packages["torch"] == torch.__version__ and packages["cuda"] == torch.version.cuda
    assert all(isinstance(v, str) for k, v in packages.items() if k != "cuda")  # all installed here
    git = record["git"]
    assert git["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", git["commit"])
    assert git["dirty"] in (True, False, None)
    assert record["device"]["type"] == "cpu" and isinstance(record["device"]["name"], (str, type(None)))
    assert isinstance(record["cpu"]["capability"], str)
    assert isinstance(record["cpu"]["avx512_bf16"], bool) and isinstance(record["cpu"]["amx_tile"], bool)
    assert record["precision"] == {"name": "fp32", "reason": REASON}
    assert record["world_size"] == 2 and record["layout"] == LAYOUT
    assert record["host_allocator"] == host_allocator()
    json.dumps(record)  # plain data only


def test_host_allocator_names_a_preloaded_library_else_the_c_library():
    preload = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
    assert host_allocator({"LD_PRELOAD": preload}) == f"LD_PRELOAD={preload}"
    assert host_allocator({}).startswith("C library malloc")


def test_layout_accepts_checkpointer_names_and_fills_gaps_from_the_config(cfg):
    layout = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "data_parallel_size": 4}
    record = describe_environment(cfg, 4, layout, torch.device("cpu"), "fp32", REASON)
    assert record["layout"] == {"tp": 1, "pp": 1, "dp": 4, "zero_stage": cfg.parallel.zero_stage}


def test_git_state_is_null_outside_a_checkout_and_without_git(tmp_path, monkeypatch):
    assert git_state(tmp_path) == {"commit": None, "dirty": None}
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable at all
    assert git_state(REPO) == {"commit": None, "dirty": None}


def test_written_atomically_with_the_umask_mode(cfg, tmp_path, umask_022):
    record = describe_environment(cfg, 2, LAYOUT, torch.device("cpu"), "fp32", REASON)
    run = tmp_path / "run"
    path = write_environment(run, record)
    assert path == run / ENVIRONMENT_FILE
    assert os.listdir(run) == [ENVIRONMENT_FILE]  # no temporary file left behind
    assert mode(path) == 0o644
    assert read_environment(run) == record
    os.umask(0o077)
    assert mode(write_environment(run, record)) == 0o600


def test_read_environment_missing_or_broken(tmp_path):
    assert read_environment(tmp_path) is None
    (tmp_path / ENVIRONMENT_FILE).write_text("{half a fi")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / ENVIRONMENT_FILE))):
        read_environment(tmp_path)


def test_config_yaml_is_readable_by_others(cfg, tmp_path, umask_022):
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert mode(tmp_path / "run" / "config.yaml") == 0o644
    assert os.listdir(tmp_path / "run") == ["config.yaml"]


def test_layer_files_and_latest_follow_the_umask(tmp_path, umask_022):
    write_latest(tmp_path, "global_step3")
    with atomic_path(tmp_path / "layer_01-model_00-model_states.pt") as tmp:
        torch.save({"w": torch.zeros(2)}, tmp)
    assert sorted(os.listdir(tmp_path)) == ["latest", "layer_01-model_00-model_states.pt"]
    assert mode(tmp_path / "latest") == 0o644 and mode(tmp_path / "layer_01-model_00-model_states.pt") == 0o644


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "latest"
    target.write_text("global_step1")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("global_st")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "global_step1" and os.listdir(tmp_path) == ["latest"]


def test_atomic_writes_fsync_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic_write_text(tmp_path / "latest", "global_step1")
    with atomic_path(tmp_path / "layer_01-model_00-model_states.pt") as tmp:
        torch.save({"w": torch.zeros(2)}, tmp)
    files, directories = synced[0::2], synced[1::2]
    assert [p.name.split(".")[1] for p in files] == ["latest", "layer_01-model_00-model_states"]
    directory = tmp_path.resolve()
    assert all(p.parent == directory and p.name.startswith(".") for p in files)  # the temporaries
    assert directories == [directory, directory]


def test_run_status_shows_the_environment(cfg, tmp_path, capsys):
    from megatron.training.logging import MetricsLogger

    run = Path(cfg.logging.run_dir)
    save_config(cfg, run / "config.yaml")
    logger = MetricsLogger(str(run), None, rank=0)
    logger.log(1, {"lm loss": 9.0, "learning-rate": 1e-3, "batch-size": 16, "consumed-tokens": 4096},
               kind="train", samples=16)
    logger.close()
    record = describe_environment(cfg, 2, LAYOUT, torch.device("cpu"), "fp32", REASON)
    record["git"] = {"commit": "0123456789abcdef" * 2 + "01234567", "dirty": True}
    write_environment(run, record)
    result = subprocess.run([sys.executable, "scripts/run_status.py", str(run)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "  commit         0123456789ab (dirty)" in text
    assert f"  packages       torch {torch.__version__}" in text
    assert "  device         cpu (" in text
    assert f"  cpu            capability {record['cpu']['capability']}, " in text
    assert f"  allocator      {record['host_allocator']}\n" in text
    assert f"  precision      fp32: {REASON}" in text
    assert "  layout         2 ranks: TP1 PP1 DP2 ZeRO-1" in text
    # --json in this process: a second interpreter would only repeat the imports
    assert run_status_module().main([str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["environment"] == record


def test_run_status_without_or_with_a_broken_environment(tmp_path):
    render = run_status_module().render
    status = {"run_dir": str(tmp_path), "metrics": {"path": "m", "exists": False}, "environment": None}
    assert "environment      none yet" in render(status)
    status["environment_problem"] = "environment.json: cannot be read"
    assert "environment      environment.json: cannot be read" in render(status)
