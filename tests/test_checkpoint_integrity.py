"""Checkpoints that cannot silently go wrong: CRC32 of every file (a bit flipped inside a tensor
is found by ``checkpoint.verify: full`` and named), and one run per checkpoint directory."""

from __future__ import annotations

import importlib
import signal
import subprocess
import sys
import zipfile
import zlib

import pytest

from conftest import REPO
from megatron.checkpoint.lock import CheckpointDirectoryLocked, CheckpointLock
from megatron.checkpoint.store import CheckpointStore, verify_checkpoint
from test_checkpoint_atomic import write_checkpoint

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
