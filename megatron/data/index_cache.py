"""Arrays built once and memory-mapped by every process: the index caches of the datasets.

A dataset's index arrays (:class:`~megatron.data.gpt_dataset.GPTDataset`'s document, sample
and shuffle indices, :class:`~megatron.data.blended_dataset.BlendedDataset`'s blend) are
deterministic, but building them for a large corpus takes seconds to minutes: one process
builds them and saves them as ``.npy`` files, written atomically, and every process
memory-maps those files. With ``torch.distributed`` initialised, global rank 0 builds and
broadcasts its outcome; without it, a file lock next to the files serialises the builders.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Mapping

import numpy as np

from megatron.utils.atomic import atomic_path

__all__ = ["build_once_and_load"]

logger = logging.getLogger(__name__)


def _save_atomic(path: str, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` so readers see either nothing or the complete file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _build_and_save(paths: Mapping[str, str], build: Callable[[], Mapping[str, np.ndarray]]) -> None:
    """Build the arrays unless every file already exists; save them atomically."""
    if all(os.path.isfile(p) for p in paths.values()):
        return
    directory = os.path.dirname(next(iter(paths.values()))) or "."
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise OSError(
            f"cannot create the index cache directory {directory}: {e}; set data.cache_dir to a writable path"
        ) from e
    if not os.access(directory, os.W_OK):
        raise PermissionError(
            f"index cache directory {directory} is not writable; set data.cache_dir to a writable "
            "path shared by all ranks"
        )
    start = time.perf_counter()
    arrays = build()
    for kind, path in paths.items():  # every file is complete on its own; all three mark a hit
        _save_atomic(path, arrays[kind])
    logger.debug("built %s in %.2f s", os.path.basename(paths[next(iter(paths))]), time.perf_counter() - start)


def _locked(lock_path: str, fn: Callable[[], None]) -> None:
    """Run ``fn`` holding an inter-process file lock (for launches without torch.distributed).

    File systems without ``flock`` (some Lustre mounts) run ``fn`` unlocked: the atomic writes
    keep the cache consistent, at worst two processes build the same files.
    """
    from filelock import FileLock  # a dependency of torch

    try:
        with FileLock(lock_path):
            fn()
    except NotImplementedError:
        fn()


def _distributed_rank() -> int | None:
    """Global rank when ``torch.distributed`` is initialised, else None."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return None
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return None


def build_once_and_load(
    paths: Mapping[str, str], build: Callable[[], Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Build cached arrays in one process, then memory-map them in every process.

    With ``torch.distributed`` initialised this is a collective over the default group: global
    rank 0 builds missing files, then broadcasts its outcome (``broadcast_object_list`` from
    rank 0: it doubles as the barrier that keeps other ranks from reading files too early, and
    lets every rank raise rank 0's error instead of hanging); then all ranks
    ``np.load(mmap_mode='r')`` the same files. Every rank must call it, in the same order, and
    the cache must be on a file system all ranks see (with NCCL, set the CUDA device first, as
    for any collective). Without ``torch.distributed``, a file lock next to the files
    (``*.lock``, left in place) makes concurrent processes build once.

    Raises:
        FileNotFoundError: a rank cannot see files rank 0 wrote (cache not on a shared file
            system).
        RuntimeError: on ranks other than 0, when rank 0 failed to build (its error quoted).
    """

    def build_if_missing() -> None:
        if not all(os.path.isfile(p) for p in paths.values()):
            lock_path = os.path.commonprefix(list(paths.values())).rstrip("_") + ".lock"
            _locked(lock_path, lambda: _build_and_save(paths, build))

    from megatron.core.distributed import on_rank0  # imports torch, which this module avoids at import time

    on_rank0(build_if_missing, "build the index cache")
    rank = _distributed_rank()
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"rank {rank}: index file {missing[0]} is missing after rank 0 built it; the data "
            "directory (or data.cache_dir) must be on a file system shared by all ranks"
        )
    return {kind: np.load(path, mmap_mode="r", allow_pickle=False) for kind, path in paths.items()}
