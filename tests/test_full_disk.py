"""A full disk never costs a checkpoint or leaves output that looks finished: a save that fills
a small tmpfs (ENOSPC) or passes the file-size limit (EFBIG) removes its partial checkpoint and
leaves the previous one intact and loadable; preprocessing on a full tmpfs keeps only its
committed progress. (Real runs on a filling disk: tests/faults/test_faults.py.)"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from megatron.checkpoint.checkpointing import Checkpointer, CheckpointSaveFailed
from megatron.checkpoint.store import CheckpointStore, verify_checkpoint
from megatron.config import config_from_dict
from megatron.core.parallel_state import ParallelState
from test_checkpoint_atomic import write_checkpoint
from test_preprocess_data import TOKENIZER, run_cli
from training_utils import tiny_run


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


@pytest.mark.skipif(not can_mount(), reason="mounting a tmpfs needs root")
def test_preprocessing_on_a_full_filesystem_leaves_no_finished_looking_output(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(3000)))
    with small_tmpfs(tmp_path, "256k") as disk:
        code = run_cli("--input", source, "--tokenizer", TOKENIZER, "--output-prefix", disk / "out", "--chunk-size",
                       "64", "--commit-interval", "0")
        err = capsys.readouterr().err
        assert code == 1 and "No space left on device" in err and "Traceback" not in err
        assert not [p.name for p in disk.iterdir() if p.name.endswith((".bin", ".idx"))]


@pytest.mark.skipif(not can_mount(), reason="mounting a tmpfs needs root")
def test_universal_conversion_on_a_full_filesystem_leaves_no_finished_looking_output(tmp_path):
    from megatron.checkpoint import universal
    from megatron.checkpoint.universal_conversion import convert_to_universal
    from megatron.errors import ConversionError

    # A real ZeRO checkpoint (Megatron-DeepSpeed's, 0.8 MB) whose universal form does not fit the disk.
    source = Path(__file__).parent / "fixtures" / "megatron_deepspeed_checkpoint" / "checkpoints" / "global_step3"
    with small_tmpfs(tmp_path, "512k") as disk:
        with pytest.raises(ConversionError, match="no space left on device.*run the same conversion again"):
            convert_to_universal(source, disk / "global_step3_universal")
        gc.collect()
        assert not universal.is_complete(disk / "global_step3_universal")
        assert not (disk / "global_step3_universal").exists()  # only the staging folder may be left, to resume
