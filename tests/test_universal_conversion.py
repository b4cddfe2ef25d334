"""The streaming universal conversion (megatron/checkpoint/universal_conversion.py and
tools/convert_checkpoint.py): the same files as DeepSpeed's own ds_to_universal, nothing final
before it is complete, resumed after an interruption without redoing finished work, and the
waiting ranks of an in-job conversion released by its marker or its failure note."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from megatron.checkpoint import universal_conversion
from megatron.checkpoint.universal import is_complete
from megatron.checkpoint.universal_conversion import convert_to_universal

FIXTURES = Path(__file__).parent / "fixtures" / "megatron_deepspeed_checkpoint"


def source_copy(tmp_path: Path, with_universal_info: bool = False, precision: str = "fp32") -> Path:
    """The Megatron-DeepSpeed fixture (TP1 x PP2; fp32 ZeRO-1 or bf16 BF16_Optimizer shards);
    optionally with BLOOM's ``universal_checkpoint_info`` added to its engine files, as DeepSpeed's
    converter requires."""
    source = tmp_path / "source" / "global_step3"
    shutil.copytree(FIXTURES / ("checkpoints" if precision == "fp32" else "checkpoints_bf16") / "global_step3",
                    source)
    if with_universal_info:
        from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

        from megatron.checkpoint.universal import universal_checkpoint_info_for

        for path in source.glob("mp_rank_*_model_states.pt"):
            state = torch.load(path, weights_only=False)  # the repository's own fixture
            state[UNIVERSAL_CHECKPOINT_INFO] = universal_checkpoint_info_for(True, state["args"].padded_vocab_size)
            torch.save(state, path)
    return source


def universal_files(directory: Path) -> dict[str, object]:
    """Every converted tensor file under ``zero/``, loaded."""
    return {p.relative_to(directory).as_posix(): torch.load(p, weights_only=False)
            for p in sorted((directory / "zero").rglob("*.pt"))}


def same(a, b) -> bool:
    """Equal tensors (bit for bit), or equal values; objects without ``==`` (DeepSpeed's loss
    scaler) by their attributes."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and sorted(a) == sorted(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dict__") and not isinstance(a, type):
        return type(a) is type(b) and same(vars(a), vars(b))
    return a == b


def assert_same_files(mine: dict, theirs: dict) -> None:
    assert sorted(mine) == sorted(theirs)
    for name, value in theirs.items():
        assert same(mine[name], value), name


@pytest.mark.slow
@pytest.mark.parametrize("precision, workers", [("fp32", 2), ("bf16", 1)])
def test_conversion_writes_what_deepspeeds_converter_writes(tmp_path, monkeypatch, precision, workers):
    """DeepSpeed's converter, told BLOOM's patterns, against ours on the checkpoint as
    Megatron-DeepSpeed wrote it (no universal_checkpoint_info: ours derives BLOOM's), here and in
    worker processes: the same files, bit for bit."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    source = source_copy(tmp_path / "deepspeed", with_universal_info=True, precision=precision)
    theirs = tmp_path / "deepspeed" / "global_step3_universal"
    with contextlib.redirect_stdout(io.StringIO()):
        ds_to_universal.main(argparse.Namespace(
            input_folder=str(source), output_folder=str(theirs), num_extract_workers=1, num_merge_workers=1,
            keep_temp_folder=False, strict=True, inject_missing_state=False))
    mine = tmp_path / "ours" / "global_step3_universal"
    monkeypatch.setattr(universal_conversion, "MIN_BYTES_FOR_WORKERS", 0)  # workers even for this small one
    report = convert_to_universal(source_copy(tmp_path / "ours", precision=precision), mine, workers=workers)
    assert is_complete(mine) and report.parameters == 29 and report.shards == 2 and report.workers == workers
    assert set(report.seconds) == {"scan", "extract", "merge", "finish", "commit"}
    assert_same_files(universal_files(mine), universal_files(theirs))
    assert sorted(p.name for p in mine.glob("mp_rank_*")) == sorted(p.name for p in theirs.glob("mp_rank_*"))


def test_an_interrupted_conversion_is_never_final_and_resumes_where_it_stopped(tmp_path, monkeypatch):
    source = source_copy(tmp_path)
    output = tmp_path / "out" / "global_step3_universal"
    real_merge = universal_conversion.merge_parameter
    calls = {"extract": 0, "merge": 0}

    def merge_then_die(*args):
        if calls["merge"] == 10:
            raise KeyboardInterrupt  # as Ctrl-C, or a job killed mid-way
        calls["merge"] += 1
        return real_merge(*args)

    monkeypatch.setattr(universal_conversion, "merge_parameter", merge_then_die)
    with pytest.raises(KeyboardInterrupt):
        convert_to_universal(source, output)
    assert not output.exists() and not is_complete(output)
    staging = output.with_name(output.name + ".tmp")
    assert len(list((staging / "progress" / "merge").iterdir())) == 10

    def count(name, real):
        def counted(*args):
            calls[name] += 1
            return real(*args)
        return counted

    calls.update(extract=0, merge=0)
    monkeypatch.setattr(universal_conversion, "merge_parameter", count("merge", real_merge))
    monkeypatch.setattr(universal_conversion, "extract_shard", count("extract", universal_conversion.extract_shard))
    report = convert_to_universal(source, output)
    assert calls == {"extract": 0, "merge": 29 - 10}
    assert (report.resumed_shards, report.resumed_parameters) == (2, 10)
    assert is_complete(output) and not staging.exists()
    convert_to_universal(source, tmp_path / "clean")
    assert_same_files(universal_files(output), universal_files(tmp_path / "clean"))


def test_waiting_ranks_are_released_by_the_marker_or_the_failure_note(tmp_path):
    from megatron.checkpoint.checkpointing import _wait_for_conversion
    from megatron.checkpoint.universal import UNIVERSAL_MARKER

    target, failure = tmp_path / "global_step3_universal", tmp_path / "global_step3_universal.failed"
    target.mkdir()
    threading.Timer(0.3, lambda: (target / UNIVERSAL_MARKER).write_text("{}")).start()
    start = time.monotonic()
    _wait_for_conversion(target, failure, rank=1, poll_seconds=0.05)
    assert time.monotonic() - start < 5
    (target / UNIVERSAL_MARKER).unlink()
    failure.write_text("ConversionError: disk full")
    with pytest.raises(RuntimeError, match="rank 1: rank 0 failed to convert .*disk full"):
        _wait_for_conversion(target, failure, rank=1, poll_seconds=0.05)


def test_the_tool_converts_a_save_root_and_names_bad_input(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import convert_checkpoint

    root = source_copy(tmp_path).parent
    (root / "latest").write_text("global_step3")
    assert convert_checkpoint.main([str(root), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "\r" not in out  # plain lines when redirected: no progress bar
    assert "GB/s" in out and ", extract " in out and ", merge " in out  # the rate and each phase's time
    assert is_complete(root / "global_step3_universal")
    assert convert_checkpoint.main([str(root), "--step", "7"]) == 1
    assert "global_step7 does not exist" in capsys.readouterr().err
