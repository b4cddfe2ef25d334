"""Checkpoints that cannot silently go wrong: CRC32 of every file (a bit flipped inside a tensor
is found by ``checkpoint.verify: full`` and named), one run per checkpoint directory, and a
save that fills the disk (ENOSPC on a small tmpfs, EFBIG under a file-size limit) removes its
partial checkpoint and leaves the previous one intact."""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import resource
import signal
import subprocess
import sys
import uuid
import zipfile
import zlib

import pytest
import torch

from conftest import REPO
from megatron.checkpoint.checkpointing import Checkpointer, CheckpointSaveFailed
from megatron.checkpoint.lock import CheckpointDirectoryLocked, CheckpointLock
from megatron.checkpoint.store import CheckpointStore, verify_checkpoint
from megatron.config import config_from_dict
from megatron.core.parallel_state import ParallelState
from test_checkpoint_atomic import write_checkpoint
from training_utils import tiny_run

verify_tool = importlib.import_module("tools.verify_checkpoint")

# -- checksums -------------------------------------------------------------------------------------


def test_manifest_records_the_crc32_of_every_file(tmp_path):
    store = CheckpointStore(tmp_path)
    write_checkpoint(store, 3)
    manifest = store.find_newest_complete()[0].manifest
    files = sorted(p.name for p in (tmp_path / "global_step3").iterdir() if p.name != "manifest.json")
    assert sorted(manifest["checksums"]["files"]) == files
    for name in files:
        assert manifest["checksums"]["files"][name] == zlib.crc32((tmp_path / "global_step3" / name).read_bytes())


def flip_bit_in_tensor(path, record_suffix="data/0"):
    """Flip one bit in the middle of the storage record ``data/0`` (a tensor's bytes) of a torch file."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(record_suffix))
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)  # local file header: name and extra-field lengths at 26
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        offset = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))
    return info.filename


def test_full_verification_finds_and_names_a_flipped_bit_inside_a_tensor(tmp_path, capsys):
    store = CheckpointStore(tmp_path)
    write_checkpoint(store, 5)
    write_checkpoint(store, 10)
    damaged = tmp_path / "global_step10" / "optim.pt"
    record = flip_bit_in_tensor(damaged)
    # Sizes and the zip directory are unchanged: only the checksums see it.
    assert verify_checkpoint(tmp_path / "global_step10", "fast") == []
    (problem,) = verify_checkpoint(tmp_path / "global_step10", "full")
    assert str(damaged) in problem and "CRC32" in problem and record in problem
    info, report = store.find_newest_complete("full")
    assert info.tag == "global_step5" and str(damaged) in report[0]

    # The offline tool (its main(), in this process: a fresh interpreter would spend seconds on imports).
    assert verify_tool.main([str(tmp_path), "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert f"BROKEN {tmp_path / 'global_step10'}" in out and record in out
    assert f"ok {tmp_path / 'global_step5'} (full)" in out and "1 of 2 checkpoints are broken" in err
    assert verify_tool.main([str(tmp_path / "global_step5"), "--quiet"]) == 0
    assert verify_tool.main([str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err


# -- one run per checkpoint directory --------------------------------------------------------------

# lock.py needs only the standard library: loaded by path, the holder starts in milliseconds.
HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("lock", sys.argv[2])
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)
lock.CheckpointLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_run_is_refused_while_the_first_lives_and_a_killed_one_holds_nothing(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), str(REPO / "megatron/checkpoint/lock.py")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointDirectoryLocked, match=f"{tmp_path} is in use by another run .pid {holder.pid} "
                                                             "on host"):
            CheckpointLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with CheckpointLock(tmp_path):  # the kernel dropped the dead holder's lock
        with pytest.raises(CheckpointDirectoryLocked):
            CheckpointLock(tmp_path).acquire()  # and this process's lock keeps out a second one


# -- a full disk during a save ---------------------------------------------------------------------


class EngineWritingBytes:
    """Stands in for DeepSpeed's engine: ``save_checkpoint`` writes ``size`` bytes of shard."""

    def __init__(self, size: int):
        self.size = size

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        os.makedirs(os.path.join(directory, tag), exist_ok=True)
        torch.save({"shard": torch.zeros(self.size // 4, dtype=torch.float32)},
                   os.path.join(directory, tag, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))


@contextlib.contextmanager
def small_tmpfs(parent, size: str):
    """A tmpfs of ``size`` mounted at a fresh directory under ``parent`` (root only)."""
    mountpoint = parent / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        gc.collect()  # a failed torch.save's writer keeps its file open until collected
        if subprocess.run(["umount", str(mountpoint)]).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)
        mountpoint.rmdir()


@contextlib.contextmanager
def file_size_limit(limit: int):
    """RLIMIT_FSIZE for this process: writes past ``limit`` bytes fail with EFBIG (Python ignores
    SIGXFSZ, so the write returns the error instead of killing the process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def can_mount() -> bool:
    return os.geteuid() == 0 and os.path.exists("/bin/mount")


def save_with(directory, engine) -> None:
    body = tiny_run(directory, [], checkpoint={"save": str(directory), "load": str(directory)})
    checkpointer = Checkpointer(config_from_dict(body), ParallelState.single())
    checkpointer._write_layer_files = lambda engine, path: None  # the stand-in engine holds no module
    checkpointer.save(engine, {"iteration": 20, "consumed_samples": 160}, {"next_learning_rate": 1e-3})


def assert_previous_checkpoint_intact(directory, message: str) -> None:
    assert f"saving checkpoint {directory / 'global_step20'} failed" in message
    assert "bytes" in message and f"{directory / 'global_step10'}, is intact" in message
    assert sorted(p.name for p in directory.iterdir() if p.name.startswith("global_step")) == ["global_step10"]
    assert verify_checkpoint(directory / "global_step10", "full") == []
    assert (directory / "latest").read_text() == "global_step10"


@pytest.mark.skipif(not can_mount(), reason="mounting a tmpfs needs root")
def test_a_save_on_a_full_filesystem_removes_its_partial_checkpoint(tmp_path):
    with small_tmpfs(tmp_path, "2m") as disk:
        write_checkpoint(CheckpointStore(disk), 10)
        with pytest.raises(CheckpointSaveFailed) as failed:
            save_with(disk, EngineWritingBytes(4 << 20))
        message = str(failed.value)
        del failed  # its traceback holds the failed writer, and so the file, open
        assert "no space left on device" in message or "write failed" in message
        assert_previous_checkpoint_intact(disk, message)


def test_a_save_past_the_file_size_limit_removes_its_partial_checkpoint(tmp_path):
    write_checkpoint(CheckpointStore(tmp_path), 10)
    with file_size_limit(1 << 20), pytest.raises(CheckpointSaveFailed) as failed:
        save_with(tmp_path, EngineWritingBytes(4 << 20))
    assert "EFBIG" in str(failed.value) or "write failed" in str(failed.value)
    assert_previous_checkpoint_intact(tmp_path, str(failed.value))
