"""bench/gpu_check.py --cpu-smoke runs end to end and writes every section of its results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# About 20 s on two cores (a subprocess: torch and transformers imports, 6 tiny variants): make test-slow.
@pytest.mark.slow
def test_gpu_check_cpu_smoke_writes_every_section(tmp_path):
    output = tmp_path / "gpu_check_cpu_smoke.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "bench/gpu_check.py"), "--cpu-smoke", "--output", str(output)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(output.read_text())
    assert result["mode"] == "cpu_smoke" and result["complete"]
    assert result["device"]["type"] == "cpu" and result["config"]["peak_flops"] is None
    assert "packages" in result["machine"]

    checks = result["kernel_checks"]
    from megatron.model.kernels import IMPLEMENTATIONS

    fused = {(k, name) for k, impls in IMPLEMENTATIONS.items() for name in impls if name != "reference"}
    assert {(c["kernel"], c.get("implementation")) for c in checks} == fused  # every one, picked up generically
    assert result["kernel_checks_passed"]
    for c in checks:
        # Skipped: no input builder, or an implementation the registry says CPU cannot run (flex, flash).
        if c["status"] == "skipped" and (c.get("reason") == "no input builder in bench/gpu_check.py"
                                         or c.get("reason", "").startswith("unavailable on cpu")):
            continue
        assert c["status"] == "pass", c
        assert set(c["rel_error"]) >= {"out"} and all(e <= c["tolerance"] for e in c["rel_error"].values())

    rows = result["training"]
    seq = result["config"]["model"]["seq_length"]
    assert [(r["variant"], r["recompute"]) for r in rows][:4] == [
        ("auto", False), ("auto", True), ("reference", False), ("reference", True)]
    for r in rows:
        if r["variant"] == "transformers" and r["status"].startswith("skipped: not importable"):
            continue
        assert r["status"] == "ok", r
        assert r["micro_batch"] == 2 and r["ms_per_step"] > 0 and r["mfu"] is None
        tokens_per_s = r["micro_batch"] * seq / (r["ms_per_step"] / 1000)
        assert abs(r["tokens_per_s"] - tokens_per_s) <= 1e-3 * tokens_per_s
        assert 0 < r["model_tflops"] <= r["hardware_tflops"]
        assert (r["hardware_tflops"] > r["model_tflops"]) == r["recompute"]  # 4F against 3F
        assert 5.0 < r["loss_first"] < 8.0  # ~ln(512) on random tokens
    assert any(r["variant"] == "transformers" for r in rows)
    # Same weights and batch: the kernel choices agree on the first loss (bf16).
    assert result["first_step_loss"]["difference_from_reference"]["auto"] < 1e-2
    assert "kernel checks" in proc.stdout and "tokens/s" in proc.stdout
