"""Every bad input of the catalogue (tests/bad_inputs.py) gets a clear message or a counted skip,
a non-zero exit on error, no traceback, and leaves the user's files as they were; the table in
docs/bad-inputs.md is what the cases print. A few cases also run as the user runs them, in their
own process (and under torchrun), where tracebacks and one-message-per-job show."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from bad_inputs import (
    CASES,
    DOC_PATH,
    ENTRY_POINTS,
    REPO,
    Case,
    Workspace,
    load_entry_point,
    render_doc,
    shown,
    snapshot,
)

RESULTS: dict[str, tuple[int, str]] = {}
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def read_only_mount(path: Path):
    """``path`` bind-mounted read-only onto itself for the duration (root only); always unmounted."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def run_in_process(case: Case, argv: list[str]) -> int:
    """The entry point's exit status for ``argv`` (argparse's SystemExit included)."""
    try:
        return int(load_entry_point(case.tool)(argv) or 0)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


@pytest.fixture
def clean_process(monkeypatch):
    """Launcher variables and the process group as they were: pretrain sets up a world of one."""
    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, capfd, caplog, clean_process):
    ws = Workspace(tmp_path / "user")
    argv = case.build(ws)
    before = snapshot(ws.root)
    capfd.readouterr()
    caplog.set_level(logging.WARNING, logger="megatron")
    mount = read_only_mount(ws.readonly) if case.needs_root else contextlib.nullcontext()
    with mount:
        status = run_in_process(case, argv)
    out, err = capfd.readouterr()
    # What rank 0's console log would have shown above the error (pytest holds the records): the
    # checkpoint search's reasons for skipping a checkpoint, which the error refers to.
    logged = "".join(f"[rank 0] {r.getMessage()}\n" for r in caplog.records
                     if r.name.startswith("megatron.checkpoint") and r.levelno >= logging.WARNING)
    assert "Traceback" not in out + err
    text = shown(case, out if case.skip else logged + err, ws.root)
    if case.skip:
        assert status == 0, err
    else:
        assert status != 0 and re.search(r"error: ", err), (status, err)
    assert case.expect in text, text
    after = snapshot(ws.root)
    changed = [name for name, data in before.items() if after.get(name) != data]
    assert not changed, f"overwritten or deleted: {changed}"
    RESULTS[case.id] = (status, text)


def test_the_catalogue_is_large_enough_and_documented():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    if len(RESULTS) < len(CASES):
        pytest.skip("runs after the whole catalogue (run the file, not a selection)")
    doc = render_doc(RESULTS)
    if os.environ.get("BAD_INPUTS_DOC") == "write":
        DOC_PATH.parent.mkdir(exist_ok=True)
        DOC_PATH.write_text(doc)
    assert DOC_PATH.read_text() == doc, "docs/bad-inputs.md is out of date: BAD_INPUTS_DOC=write rewrites it"


def _python(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    environ.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=environ,
                          cwd=REPO)


def test_truncated_gzip_as_a_user_runs_it(tmp_path):
    """The first defect of the issue, in its own process: a message, no EOFError traceback."""
    case = next(c for c in CASES if c.id == "jsonl-gz-truncated")
    ws = Workspace(tmp_path)
    result = _python(str(ENTRY_POINTS["preprocess_data"]), *case.build(ws))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("the gzip stream is truncated or corrupt") == 1
    assert not list((tmp_path / "out").glob("*.bin")) if (tmp_path / "out").exists() else True


def _torchrun(case_id: str, tmp_path: Path, nproc: int) -> tuple[subprocess.CompletedProcess, str]:
    case = next(c for c in CASES if c.id == case_id)
    argv = case.build(Workspace(tmp_path))
    from launch import free_port

    result = _python("-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
                     f"--rdzv-id={uuid.uuid4().hex}", str(ENTRY_POINTS["pretrain_bloom"]), *argv)
    return result, case.expect


def _one_message_per_job(result: subprocess.CompletedProcess, expect: str) -> None:
    assert result.returncode != 0
    # The worker's message once; the only traceback allowed is torchrun's own closing summary,
    # which names no frame of ours.
    assert result.stderr.count(expect) == 1, result.stderr
    assert "megatron/" not in result.stderr and 'pretrain_bloom.py", line' not in result.stderr, result.stderr


@pytest.mark.distributed
def test_corrupt_idx_under_torchrun_is_one_message(tmp_path):
    """The second defect of the issue: every rank opens the corrupt .idx; rank 0 alone says so."""
    _one_message_per_job(*_torchrun("idx-corrupt-sizes", tmp_path, nproc=2))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case_id,nproc", [("launch-world-size", 3), ("ckpt-truncated-shard", 2),
                                           ("config-unknown-field", 2), ("ckpt-model-shape", 2)])
def test_more_cases_under_torchrun(case_id, nproc, tmp_path):
    _one_message_per_job(*_torchrun(case_id, tmp_path, nproc))


def test_the_good_inputs_work(tmp_path):
    """The catalogue's starting points are sound, so each case fails for the defect it adds: the
    good HF folder imports and the good config passes the data check."""
    from bad_inputs import load_entry_point

    ws = Workspace(tmp_path)
    folder = ws.hf_folder(shards=True)
    assert load_entry_point("convert_from_hf")(["--hf", str(folder), "--output", str(tmp_path / "ok"), "--quiet"]) == 0
    assert load_entry_point("pretrain_bloom")([*ws.pretrain(), "--dry-run", "--check-data"]) == 0
