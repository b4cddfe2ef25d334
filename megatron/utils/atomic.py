"""Replacing a file atomically and durably, with the permissions a plain ``open(path, "w")`` would give it.

Readers (a resuming job, ``scripts/run_status.py``, a colleague's shell) must see either the old
file or the complete new one, also after the node crashes or loses power. Every writer in this
project follows one rule, implemented here:

1. write a temporary file in the target's directory (``.{name}.<random>``: same file system, so
   the rename is atomic; the leading dot keeps it out of globs and layer-file discovery);
2. flush and ``fsync`` it, so its data is on disk before any name points at it;
3. ``os.replace`` it over the target;
4. ``fsync`` the directory, so the rename itself survives a crash.

A failure before step 3 removes the temporary and leaves the target as it was; when the disk
was full, :func:`disk_full_reason` says so (torch's writer loses the errno on the way).

Whole directories follow the same rule one level up, as a checkpoint's commit does
(``CheckpointStore.commit``): write everything under a temporary name next to the target,
``fsync_tree`` it, rename the directory, ``fsync_path`` its parent.

``tempfile.mkstemp`` is not used for the temporary file: it creates files 0600 whatever the
umask, and the rename keeps the mode, so config.yaml or a checkpoint's files would be unreadable
to the rest of the group. Creating the file with mode 0666 lets the kernel apply the umask (0644
under the usual 022) and a directory's default ACL exactly as for ``open``, without reading or
changing the process-wide umask, which other threads may depend on.

    atomic_write_text(run_dir / "config.yaml", text)
    with atomic_path(directory / "layer_01-model_00-model_states.pt") as tmp:
        torch.save(state, tmp)
"""

from __future__ import annotations

import errno
import os
import re
import resource
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

_ATTEMPTS = 100  # as tempfile: a name clash is only likely with a directory full of leftovers
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a directory's) data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str | os.PathLike) -> list[Path]:
    """fsync every file under ``directory`` and every directory in it (step 2 of the rule for a
    whole directory, before its rename); returns the files, sorted."""
    files = []
    for path in sorted(Path(directory).rglob("*")):
        fsync_path(path)
        if path.is_file():
            files.append(path)
    fsync_path(directory)
    return files


def create_temporary(path: str | os.PathLike) -> tuple[int, Path]:
    """A new empty file ``.{name}.<random>`` next to ``path``, open for writing: ``(fd, its path)``."""
    path = Path(path)
    for _ in range(_ATTEMPTS):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        try:
            return os.open(tmp, _FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {path} in {_ATTEMPTS} tries: "
                          f"remove the leftover .{path.name}.* files in {path.parent}")


def _publish(tmp: Path, path: str | os.PathLike) -> None:
    """Steps 3 and 4 of the rule, for a temporary whose data is already fsynced."""
    os.replace(tmp, path)
    fsync_path(Path(path).parent)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the path of a new empty temporary file next to ``path``, for writers that want a
    file name (``torch.save``). When the block ends normally the temporary is fsynced and
    replaces ``path``; when it raises, the temporary is removed and ``path`` is left as it was."""
    fd, tmp = create_temporary(path)
    os.close(fd)
    try:
        yield tmp
        fsync_path(tmp)
        _publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` by ``data``: a reader sees the old content or the new, never a mix."""
    fd, tmp = create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` by ``text`` (see ``atomic_write_bytes``)."""
    atomic_write_bytes(path, text.encode(encoding))


_TORCH_WRITE_FAILURE = re.compile(r"iostream error|write failed|unexpected pos")
_NEARLY_FULL = 1 << 20  # free bytes under which a failed write is put down to a full file system
_DISK_FULL_ERRNOS = {errno.ENOSPC: "no space left on device (ENOSPC)", errno.EDQUOT: "disk quota exceeded (EDQUOT)",
                     errno.EFBIG: "file larger than the file-size limit (EFBIG)"}


def disk_full_reason(exc: BaseException, directory: str | Path | None = None) -> Optional[str]:
    """What filled up, when ``exc`` (or an exception it was raised from) is a failed write; else None.

    ``torch.save`` reports a failed write as a RuntimeError without the errno ("iostream error",
    "file write failed", "unexpected pos"): the cause is then read from the machine, a full
    file system under ``directory`` or a finite file-size limit (``ulimit -f``).
    """
    seen: Optional[BaseException] = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL_ERRNOS:
            return _DISK_FULL_ERRNOS[seen.errno]
        if isinstance(seen, RuntimeError) and _TORCH_WRITE_FAILURE.search(str(seen)):
            break
        seen = seen.__cause__ or seen.__context__
    else:
        return None
    if directory is not None and shutil.disk_usage(directory).free < _NEARLY_FULL:
        return _DISK_FULL_ERRNOS[errno.ENOSPC]
    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return (f"{_DISK_FULL_ERRNOS[errno.EFBIG]}: the file-size limit is "
                f"{resource.getrlimit(resource.RLIMIT_FSIZE)[0]:,} bytes")
    return f"a file write failed ({str(seen).splitlines()[0][:200]})"
