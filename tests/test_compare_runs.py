"""tools/compare_runs.py on two runs' metrics.jsonl written by the trainer's own logger."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

from megatron.training.logging import MetricsLogger, valid_scalars

REPO = Path(__file__).resolve().parents[1]


def load_tool():
    spec = importlib.util.spec_from_file_location("tool_compare_runs", REPO / "tools" / "compare_runs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write_run(run_dir: Path, train_losses: list[float], tokens_per_step: int, valid: dict[int, dict[str, float]]):
    """A run's metrics.jsonl as pretrain_bloom.py writes it (the resumed step 2 logged twice)."""
    logger = MetricsLogger(str(run_dir), None, rank=0)
    for step, loss in enumerate(train_losses, start=1):
        tokens = step * tokens_per_step
        logger.log(step, {"lm loss": loss + (1.0 if step == 2 else 0.0), "consumed-tokens": tokens}, "train",
                   samples=step, tokens=tokens)
        if step == 2:  # a resume repeats step 2: the last record wins
            logger.log(step, {"lm loss": loss, "consumed-tokens": tokens}, "train", samples=step, tokens=tokens)
        if step in valid:
            logger.log(step, valid_scalars(valid[step]), "valid", samples=step, tokens=tokens)
    logger.close()


def test_compare_runs_table_and_plot(tmp_path, capsys):
    write_run(tmp_path / "base", [5.0, 4.0, 3.0, 2.0], 1000, {2: {"overall": 4.5, "fr": 4.4}, 4: {"overall": 2.5, "fr": 2.4, "sw": 2.6}})
    write_run(tmp_path / "alpha", [5.5, 4.5, 3.5], 2000, {3: {"overall": 3.0, "fr": 2.2, "python": 1.5}})
    tool = load_tool()
    png = tmp_path / "cmp.png"
    assert tool.main([str(tmp_path / "base"), str(tmp_path / "alpha" / "metrics.jsonl"), "--window", "2",
                      "--languages", "fr,sw", "--output", str(png)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in out if line and not line.startswith(("-", "run", "language"))}
    assert rows["base"][1:] == ["4", "4,000", "2.5000", "2.5000", f"{math.exp(2.5):.2f}"]
    assert rows["alpha"][1:] == ["3", "6,000", "4.0000", "3.0000", f"{math.exp(3.0):.2f}"]
    assert rows["fr"][1:] == ["2.4000", "2.2000*"] and rows["sw"][1:] == ["2.6000*", "-"]
    assert rows["python"][1:] == ["-", "1.5000*"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = tool.load_run(tmp_path / "alpha")
    assert run.train == [(2000, 5.5), (4000, 4.5), (6000, 3.5)] and run.valid["python"] == [(6000, 1.5)]


def test_compare_runs_errors(tmp_path, capsys):
    tool = load_tool()
    assert tool.main([str(tmp_path / "nowhere")]) == 1
    assert "nowhere does not exist: pass a run directory" in capsys.readouterr().err
