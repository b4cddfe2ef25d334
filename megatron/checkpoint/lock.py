"""One run per checkpoint directory: an exclusive lock on ``{checkpoint.save}/.lock``.

Two jobs saving into one directory (a SLURM array started twice, a job resubmitted while the
old one still runs) would overwrite each other's ``global_stepN``, ``latest`` and retention.
Rank 0 takes the lock before resuming and holds it until the process ends.

The lock is ``flock`` on an open file, so the kernel drops it when its process dies, by
SIGKILL, OOM killer or node reboot alike: a dead job never holds it, and nothing has to be
deleted by hand. The file itself stays; it holds the holder's host, pid and start time, read
only to say who holds it. ``flock`` is local to one machine on NFS v2/v3 and some parallel file
systems (Lustre mounted without ``flock``): there it protects against a second job on the same
node only.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from megatron.errors import ProjectError

LOCK_FILE = ".lock"


class CheckpointDirectoryLocked(ProjectError, RuntimeError):
    """Another live process holds the lock of a checkpoint directory; the message names it."""


class CheckpointLock:
    """The exclusive lock of one checkpoint directory, held from :meth:`acquire` to :meth:`release`
    (or the end of the process)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock without waiting; raise :class:`CheckpointDirectoryLocked` naming the
        holder when another process has it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(self.path)
            os.close(fd)
            raise CheckpointDirectoryLocked(
                f"checkpoint directory {self.directory} is in use by another run ({holder}): two runs saving "
                "into one directory overwrite each other's checkpoints. Wait for that run to end, stop it, or "
                "set checkpoint.save to another directory") from None
        # Who holds it, for the message above; written in place (the lock is on the inode).
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the process ending drops it too)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "CheckpointLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(path: Path) -> str:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
