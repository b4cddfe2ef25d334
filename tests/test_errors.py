"""The entry points' error report (megatron.errors.reports_errors): one message per job, from
rank 0, no traceback, a non-zero status; bugs keep their traceback."""

from __future__ import annotations

import pytest

from megatron import errors
from megatron.errors import ConfigError, DataError, ReportedByRank0, reports_errors


def _main(exc: BaseException):
    @reports_errors("tool")
    def main() -> int:
        raise exc

    return main


@pytest.fixture
def rank(monkeypatch):
    """Set this process's place in a world of two; no waiting for rank 0."""
    monkeypatch.setattr(errors, "RANK0_GRACE_SECONDS", 0.0)

    def place(r: int, world: int = 2) -> None:
        monkeypatch.setenv("RANK", str(r))
        monkeypatch.setenv("WORLD_SIZE", str(world))

    return place


def test_rank0_prints_the_message_and_returns_its_status(rank, capsys):
    rank(0)
    assert _main(ConfigError("model.num_layers must be int"))() == 2
    assert capsys.readouterr().err == "tool: config error: model.num_layers must be int\n"
    assert _main(DataError("data.datasets is empty"))() == 1
    assert capsys.readouterr().err == "tool: error: data.datasets is empty\n"


def test_other_ranks_stay_silent_about_what_rank0_reports(rank, capsys):
    rank(1)
    assert _main(ReportedByRank0("rank 1: rank 0 failed to check: ConfigError: x"))() == 1
    assert capsys.readouterr().err == ""


def test_an_error_only_another_rank_met_is_printed_by_it(rank, capsys):
    rank(1)
    assert _main(FileNotFoundError(2, "No such file or directory", "/data/x.idx"))() == 1
    assert capsys.readouterr().err == "tool rank 1: error: [Errno 2] No such file or directory: '/data/x.idx'\n"


def test_a_bug_keeps_its_traceback(rank):
    rank(0, world=1)
    with pytest.raises(KeyError):
        _main(KeyError("bug"))()
