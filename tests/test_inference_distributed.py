"""tools/evaluate.py and tools/generate.py under torchrun: TP=2, DP=2 and (evaluation) PP=2 give
what one process gives (the checkpoint's TP=2 files re-split or merged as needed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from launch import run_command
from test_inference import load_tool, setup  # noqa: F401 - setup is the shared module fixture

REPO = Path(__file__).resolve().parents[1]


def torchrun(tool: str, nproc: int, *args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(REPO / "tools" / f"{tool}.py"), *args]
    result = run_command(command, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_evaluate_and_generate_at_tp2_dp2_pp2_equal_one_process(setup, tmp_path):  # noqa: F811
    root, _ = setup
    data = ["--data", f"fr={root / 'fr.jsonl'}", "--data", str(root / "sw_text_document"), "--max-windows", "7", "--seq-length", "32",
            "--micro-batch-size", "2", "--quiet"]
    assert load_tool("evaluate").main(["--checkpoint", str(root / "ckpt"), *data,
                                       "--output", str(tmp_path / "one.json")]) == 0
    torchrun("evaluate", 2, "--checkpoint", str(root / "ckpt"), "--tensor-model-parallel-size", "2", *data,
             "--output", str(tmp_path / "tp2.json"))
    torchrun("evaluate", 2, "--checkpoint", str(root / "hf"), *data, "--output", str(tmp_path / "dp2.json"))
    one = json.loads((tmp_path / "one.json").read_text())
    for name, layout in (("tp2", {"tp": 2, "pp": 1, "dp": 1}), ("dp2", {"tp": 1, "pp": 1, "dp": 2})):
        other = json.loads((tmp_path / f"{name}.json").read_text())
        assert other["layout"] == layout
        for lang in ("fr", "sw"):
            assert other["languages"][lang]["tokens"] == one["languages"][lang]["tokens"]
            assert other["languages"][lang]["loss"] == pytest.approx(one["languages"][lang]["loss"], abs=1e-5)

    # PP=2: DeepSpeed's pipeline engine, whole micro-batches only (6 of the 7 windows).
    six = [*data[:4], "--max-windows", "6", "--seq-length", "32", "--micro-batch-size", "2", "--quiet"]
    assert load_tool("evaluate").main(["--checkpoint", str(root / "ckpt"), *six,
                                       "--output", str(tmp_path / "one6.json")]) == 0
    torchrun("evaluate", 2, "--checkpoint", str(root / "ckpt"), "--pipeline-model-parallel-size", "2", *data,
             "--output", str(tmp_path / "pp2.json"))
    one6, pp2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one6", "pp2"))
    assert pp2["layout"] == {"tp": 1, "pp": 2, "dp": 1}
    for lang in ("fr", "sw"):
        assert pp2["languages"][lang]["tokens"] == one6["languages"][lang]["tokens"] == 6 * 32
        assert pp2["languages"][lang]["loss"] == pytest.approx(one6["languages"][lang]["loss"], abs=1e-5)

    prompts = ["--prompt", "Tous les êtres humains naissent", "--prompt", "def __init__(self", "--max-new-tokens", "10",
               "--quiet"]
    assert load_tool("generate").main(["--checkpoint", str(root / "ckpt"), *prompts,
                                       "--output", str(tmp_path / "g1.json")]) == 0
    torchrun("generate", 2, "--checkpoint", str(root / "ckpt"), "--tensor-model-parallel-size", "2", *prompts,
             "--output", str(tmp_path / "g2.json"))
    greedy = [r["new_ids"] for r in json.loads((tmp_path / "g1.json").read_text())]
    assert [r["new_ids"] for r in json.loads((tmp_path / "g2.json").read_text())] == greedy
