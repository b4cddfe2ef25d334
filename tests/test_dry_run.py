"""``pretrain_bloom.py --dry-run``: exact parameter counts for the six published sizes."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

import pretrain_bloom
from conftest import CONFIGS, REPO

EXPECTED = {
    "560m": 559_214_592,
    "1b1": 1_065_314_304,
    "1b7": 1_722_408_960,
    "3b": 3_002_557_440,
    "7b1": 7_069_016_064,
    "176b": 176_247_271_424,
}


@pytest.fixture(autouse=True)
def no_launcher_world(monkeypatch):
    """An in-process training test earlier in the session leaves WORLD_SIZE=1 in os.environ
    (what the launcher would set), which a dry run reads as its world size."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.mark.parametrize("size", EXPECTED)
def test_dry_run_counts(size, capsys):
    assert pretrain_bloom.main(["--config", str(CONFIGS / f"bloom-{size}.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"parameters: {EXPECTED[size]:,}\n" in out
    # The embedding is V x h (padded vocabulary 250,880, BLOOM's), from the published shapes.
    hidden = {"560m": 1024, "1b1": 1536, "1b7": 2048, "3b": 2560, "7b1": 4096, "176b": 14336}[size]
    assert f"  embedding: {250880 * hidden:,}\n" in out


def test_176b_dry_run_cli_is_fast_and_shows_the_layout():
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "pretrain_bloom.py", "--config", "configs/bloom-176b.yaml", "--dry-run",
                             "--world-size", "384"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "parameters: 176,247,271,424" in result.stdout
    assert "TP4 PP12 DP8 over 384 ranks" in result.stdout
    # The planner's prediction for the layout (tools/plan.py's code): memory and throughput.
    assert "per GPU, fits in 80 GiB" in result.stdout and "TFLOP/s per GPU hardware" in result.stdout
    assert time.perf_counter() - start < 60


def test_bad_config_exits_nonzero_with_the_field(capsys, tmp_path):
    code = pretrain_bloom.main(["--config", str(CONFIGS / "bloom-560m.yaml"), "--dry-run", "--set", "model.n_layer=4"])
    assert code == 2
    assert "did you mean 'num_layers'" in capsys.readouterr().err
