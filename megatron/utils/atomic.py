"""Replacing a file atomically, with the permissions a plain ``open(path, "w")`` would give it.

Readers (a resuming job, ``scripts/run_status.py``, a colleague's shell) must see either the old
file or the complete new one, so writers fill a temporary file in the same directory and
``os.replace`` it over the target.

``tempfile.mkstemp`` is not used for that temporary file: it creates files 0600 whatever the
umask, and the rename keeps the mode, so config.yaml or a checkpoint's files would be unreadable
to the rest of the group. Creating the file with mode 0666 lets the kernel apply the umask (and a
directory's default ACL) exactly as for ``open``, without reading or changing the process-wide
umask, which other threads may depend on.

    atomic_write_text(run_dir / "config.yaml", text)
    with atomic_path(directory / "layer_01-model_00-model_states.pt") as tmp:
        torch.save(state, tmp)
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_ATTEMPTS = 100  # as tempfile: a name clash is only likely with a directory full of leftovers
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def create_temporary(path: str | os.PathLike) -> tuple[int, Path]:
    """A new empty file ``.{name}.<random>`` next to ``path``, open for writing: ``(fd, its path)``.

    Next to the target, so that the final ``os.replace`` is a rename within one file system; the
    leading dot keeps it out of globs and layer-file discovery while it is being written.
    """
    path = Path(path)
    for _ in range(_ATTEMPTS):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        try:
            return os.open(tmp, _FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {path} in {_ATTEMPTS} tries: "
                          f"remove the leftover .{path.name}.* files in {path.parent}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the path of a new empty temporary file next to ``path``, for writers that want a
    file name (``torch.save``). When the block ends normally the temporary replaces ``path``;
    when it raises, the temporary is removed and ``path`` is left as it was."""
    fd, tmp = create_temporary(path)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` by ``data``: a reader sees the old content or the new, never a mix."""
    fd, tmp = create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` by ``text`` (see ``atomic_write_bytes``)."""
    atomic_write_bytes(path, text.encode(encoding))
