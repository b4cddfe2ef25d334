"""A converter's output folder appears complete or not at all: it is filled under
``<output>.tmp`` and renamed over ``output`` when done (an old ``output`` is moved aside first and
deleted last, so an interruption never leaves neither). The folder follows
megatron/utils/atomic.py's durability rule one level up: its files are fsynced before the rename,
the parent directory after it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from megatron.errors import ConversionError
from megatron.utils.atomic import fsync_path, fsync_tree


def prepare_output(output: Path, overwrite: bool) -> Path:
    """A fresh ``<output>.tmp`` folder to fill; refuses an existing ``output`` unless ``overwrite``."""
    if output.exists() and not overwrite:
        raise ConversionError(f"output {output} already exists: choose another --output or pass --overwrite")
    tmp = output.with_name(output.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left over from an interrupted export
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, output: Path) -> None:
    """Move the finished ``tmp`` folder to ``output`` (replacing an old one last)."""
    old = None
    if output.exists():
        old = output.with_name(output.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(output, old)
    fsync_tree(tmp)
    os.replace(tmp, output)
    fsync_path(output.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
