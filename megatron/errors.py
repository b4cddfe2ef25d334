"""The project's exceptions, and how an entry point reports them.

Every error the project raises on purpose (a bad config, a corrupt dataset, an unusable
checkpoint or model folder) derives from :class:`ProjectError`. Its message is written for the
user: it names the file and the field and says what to do. The entry points
(``pretrain_bloom.py``, ``tools/*.py``) wrap their ``main`` in :func:`reports_errors`, which prints
such a message once, without a traceback, and exits non-zero. Anything else is a bug and keeps its
traceback.

Under torchrun every rank runs the same ``main``. A problem that every rank meets (a config that
does not fit the world size, a corrupt ``.idx`` every rank opens) is raised on every rank; a
problem that one rank meets on behalf of all is relayed by
:func:`megatron.core.distributed.on_rank0` as :class:`ReportedByRank0`. Either way global rank 0
holds the message, so only rank 0 prints it: one message per job. The other ranks wait a moment
before they exit (torchrun stops every rank once one fails, and must not stop rank 0 before it has
printed); a rank still running after that met an error rank 0 did not, and prints its own.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., int])


class ProjectError(Exception):
    """An error raised on purpose, whose message tells the user what is wrong and what to do."""

    label = "error"  # how the message is introduced
    exit_status = 1


class ConfigError(ProjectError, ValueError):
    """A configuration problem; the message names the field and says how to fix it."""

    label = "config error"
    exit_status = 2  # a bad argument, as argparse's


class ConversionError(ProjectError, ValueError):
    """A checkpoint, layer file or model folder that cannot be read or converted; the message says
    what to check."""


class CheckpointError(ProjectError, ValueError):
    """A checkpoint directory that cannot be resumed from (incomplete, edited, another model)."""


class UntrustedCheckpointError(ConversionError):
    """A checkpoint file whose pickle names a type outside the allow-list of
    megatron/checkpoint/pickle_scan.py: loading it could run arbitrary code, so it is refused."""


class UsageError(ProjectError, ValueError):
    """Command-line options that cannot work together or with the given files; the message says
    which option to change."""

    exit_status = 2  # a bad argument, as argparse's


class DataError(ProjectError, ValueError):
    """Training data that does not fit the run: missing or mismatched datasets or tokenizer."""


class IndexedDatasetError(ProjectError, ValueError):
    """A ``.bin``/``.idx`` pair is missing, corrupt, truncated or inconsistent."""


class MissingIndexedDatasetError(IndexedDatasetError, FileNotFoundError):
    """The ``.idx`` or ``.bin`` file does not exist."""


class PreprocessError(ProjectError, RuntimeError):
    """A failure that ends preprocessing with a message for the user (exit status 1)."""


class ReportedByRank0(ProjectError, RuntimeError):
    """Raised on the other ranks when rank 0 failed, with a :class:`ProjectError`, at work it did
    for all of them; rank 0 prints the message, these ranks only exit non-zero."""


# How long a rank other than 0 waits, after an expected error, for rank 0 to print it and exit;
# torchrun then ends this rank. Rank 0 needs well under a second; the rest is margin for a loaded
# machine. A rank still alive after it met an error that rank 0 did not meet: it prints its own.
RANK0_GRACE_SECONDS = 10.0


def world_size() -> int:
    """Processes in this job: the process group's size when one exists, else the launcher's."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")) or 1)


def process_rank() -> int:
    """This process's global rank: the process group's when one exists, else the launcher's."""
    dist = sys.modules.get("torch.distributed")  # never import torch just to print a message
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)


def error_message(prog: str, exc: BaseException) -> str:
    """What an entry point prints for an expected error: ``[PROG: ]LABEL: MESSAGE``."""
    label = getattr(exc, "label", "error")
    return f"{prog}: {label}: {exc}" if prog else f"{label}: {exc}"


def reports_errors(prog: str = "") -> Callable[[F], F]:
    """Decorate an entry point's ``main``: a :class:`ProjectError`, or an ``OSError`` (a file
    that cannot be read or written: its message names it), is printed once as
    ``[PROG: ]error: MESSAGE`` by global rank 0 and ends the process with the error's
    ``exit_status`` (1; 2 for a config error); the other ranks give rank 0 time to print and
    exit (see the module's docstring) and then print only an error rank 0 did not have.
    ``KeyboardInterrupt`` gives 130."""

    def decorate(main: F) -> F:
        @functools.wraps(main)
        def wrapper(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted" if prog else "interrupted", file=sys.stderr, flush=True)
                return 130
            except (ProjectError, OSError) as exc:
                rank = process_rank()
                if rank != 0 and world_size() > 1:
                    # Exiting at once could make the launcher stop rank 0 before it prints.
                    time.sleep(RANK0_GRACE_SECONDS)
                    if isinstance(exc, ReportedByRank0):
                        return getattr(exc, "exit_status", 1)
                    prog_rank = f"{prog} rank {rank}" if prog else f"rank {rank}"
                    print(error_message(prog_rank, exc), file=sys.stderr, flush=True)
                elif not isinstance(exc, ReportedByRank0):
                    print(error_message(prog, exc), file=sys.stderr, flush=True)
                return getattr(exc, "exit_status", 1)

        return wrapper  # type: ignore[return-value]

    return decorate
