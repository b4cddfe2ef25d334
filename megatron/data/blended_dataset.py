"""Weighted blends of datasets (languages): Megatron's greedy blending rule and BlendedDataset.

:class:`BlendedDataset` interleaves any number of datasets with Megatron's greedy rule: sample
``t`` goes to the dataset whose achieved share lags its weight most, i.e. the ``argmax_i`` of
``w_i * max(t, 1) - count_i`` (ties to the lowest index, float64 arithmetic as Megatron's C++
``build_blending_indices``), so every prefix of the blend is within a few samples of the weights
and the order is deterministic. Unlike Megatron's uint8 index, the dataset index is int16 (int32
above 32,767 datasets), so blends are not limited to 255 datasets.

The greedy rule is inherently sequential (each choice depends on all earlier ones), so it runs
as a 15-line C loop (``blend_kernel.c``, shipped with the package) compiled on first use with
the system C compiler (``$CC``, ``cc`` or ``gcc``; cached under ``~/.cache/bloom_megatron``) and
loaded with ``ctypes``. It builds 10M samples in about a second over 2-46 datasets and a few
seconds over 300; without a compiler an identical numpy loop runs instead, with a warning, 20-400x
slower (about 100x at 46 datasets); see bench/README.md, "Data index build and load".
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from importlib import resources
from typing import Any, Sequence

import numpy as np

from megatron.data.blend_weights import normalize_weights
from megatron.data.index_cache import build_once_and_load
from megatron.utils.atomic import atomic_path

__all__ = [
    "BlendedDataset",
    "build_blending_indices",
]

logger = logging.getLogger(__name__)

# Megatron over-allocates every component by 0.5% so the greedy blend never runs out of samples.
OVERSAMPLE = 1.005


# ---------------------------------------------------------------------------------------------
# Blending indices: Megatron's greedy, native loop with a numpy fallback
# ---------------------------------------------------------------------------------------------

# The C loop ships as package data and is compiled on first use. Its text is hashed into the
# name of the compiled library, so an edited source is never served a stale build.
_KERNEL_FILE = "blend_kernel.c"


def _kernel_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "bloom_megatron")


@functools.lru_cache(maxsize=1)
def _native_kernel() -> Any | None:
    """The compiled greedy loop, or None when no C compiler works here.

    The shared object is keyed by a hash of the source and the platform and written with an
    atomic rename, so concurrent ranks compiling at once all end up loading a complete file.
    If the per-user cache is not writable it is compiled into a fresh private temporary
    directory (never a shared, predictable path another user could plant a library in).
    """
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    kernel_file = resources.files(__package__).joinpath(_KERNEL_FILE)
    source = kernel_file.read_text(encoding="utf-8")
    key = hashlib.blake2b(f"{source}{sys.platform}{platform.machine()}".encode(), digest_size=8).hexdigest()
    for directory in (_kernel_cache_dir(), None):
        try:
            if directory is None:
                directory = tempfile.mkdtemp(prefix="bloom_megatron_")  # mode 0700
            so_path = os.path.join(directory, f"blend_kernel_{key}.so")
            if not os.path.isfile(so_path):
                os.makedirs(directory, exist_ok=True)
                with atomic_path(so_path) as tmp_so, resources.as_file(kernel_file) as src:
                    # No FMA contraction: the result must equal the numpy fallback bit for bit.
                    cmd = [compiler, "-O2", "-ffp-contract=off", "-shared", "-fPIC", "-o", str(tmp_so), str(src)]
                    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            lib = ctypes.CDLL(so_path)
        except (OSError, subprocess.SubprocessError) as e:
            # The numpy fallback gives the same indices, 20-400x slower: worth a line, not a failure.
            stderr = getattr(e, "stderr", b"") or b""
            logger.warning("could not build the C blend kernel in %s (%s%s); %s", directory, e,
                           f": {stderr.decode(errors='replace').strip()[:300]}" if stderr else "",
                           "trying a private temporary directory" if directory == _kernel_cache_dir()
                           else "using the numpy fallback")
            continue
        fn = lib.build_blending_indices
        ptr = np.ctypeslib.ndpointer
        fn.argtypes = [
            ptr(np.float64, flags="C_CONTIGUOUS"),
            ctypes.c_int64,
            ctypes.c_int64,
            ptr(np.int32, flags="C_CONTIGUOUS,WRITEABLE"),
            ptr(np.int64, flags="C_CONTIGUOUS,WRITEABLE"),
            ptr(np.int64, flags="C_CONTIGUOUS,WRITEABLE"),
        ]
        fn.restype = None
        return fn
    return None


def _blend_numpy(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference implementation of the greedy (same float64 operations as the C loop)."""
    counts = np.zeros(len(weights), dtype=np.int64)
    dataset_index = np.empty(size, dtype=np.int32)
    dataset_sample_index = np.empty(size, dtype=np.int64)
    for t in range(size):
        best = int(np.argmax(weights * float(max(t, 1)) - counts))  # argmax: first of ties
        dataset_index[t] = best
        dataset_sample_index[t] = counts[best]
        counts[best] += 1
    return dataset_index, dataset_sample_index


def _index_dtype(num_datasets: int) -> np.dtype:
    """Smallest signed dtype for dataset ids: int16 up to 32,767 datasets, else int32."""
    return np.dtype(np.int16) if num_datasets <= np.iinfo(np.int16).max else np.dtype(np.int32)


def build_blending_indices(
    weights: Sequence[float], size: int, *, native: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Assign each of ``size`` samples to a dataset with Megatron's greedy error-minimising rule.

    Args:
        weights: one positive weight per dataset (normalised here).
        size: number of blended samples.
        native: True forces the compiled loop, False the numpy loop, None picks the compiled
            loop when a C compiler is available.

    Returns:
        ``(dataset_index, dataset_sample_index)``: the dataset of sample ``t`` (int16, or int32
        above 32,767 datasets) and the running sample number within it (int64).
    """
    w = np.ascontiguousarray(normalize_weights(weights, "blend weights"))
    if size < 0:
        raise ValueError(f"build_blending_indices: size must be >= 0, got {size}")
    kernel = _native_kernel() if native is not False else None
    if native and kernel is None:
        raise RuntimeError("build_blending_indices(native=True): no working C compiler (set $CC or install gcc)")
    if kernel is not None:
        dataset_index = np.empty(size, dtype=np.int32)
        dataset_sample_index = np.empty(size, dtype=np.int64)
        kernel(w, len(w), size, dataset_index, dataset_sample_index, np.zeros(len(w), dtype=np.int64))
    else:
        if size > 1_000_000:
            warnings.warn(
                f"building a blend of {size} samples with the numpy fallback (seconds per million "
                "samples): install a C compiler (gcc) to make it about 100x faster",
                stacklevel=2,
            )
        dataset_index, dataset_sample_index = _blend_numpy(w, size)
    return dataset_index.astype(_index_dtype(len(w)), copy=False), dataset_sample_index


# ---------------------------------------------------------------------------------------------
# The blended dataset
# ---------------------------------------------------------------------------------------------


def _describe(dataset: Any, i: int) -> str:
    """A human name for ``dataset`` (its path and split when it has them) in error messages."""
    prefix = getattr(dataset, "path_prefix", None)
    name = getattr(dataset, "name", None)
    if prefix is not None:
        return f"dataset {i} ({prefix}{' ' + name if name else ''})"
    return f"dataset {i}" + (f" ({name})" if name else "")


class BlendedDataset:
    """``size`` samples drawn from ``datasets`` in proportion to ``weights``.

    Sample ``t`` is sample ``dataset_sample_index[t]`` of dataset ``dataset_index[t]`` (see
    :func:`build_blending_indices`); each component must hold at least as many samples as the
    blend takes from it (give it ``ceil(size * weight * 1.005)`` as Megatron does).

    Args:
        datasets: any indexable, sized datasets (e.g. :class:`GPTDataset`).
        weights: positive weights, one per dataset (normalised).
        size: number of samples of the blend.
        cache_dir: if given, the indices are cached there (built by one rank, memory-mapped
            by all; a collective when ``torch.distributed`` is initialised); otherwise every
            process computes them (deterministic).
        name: used in cache file names and messages.
    """

    def __init__(
        self,
        datasets: Sequence[Any],
        weights: Sequence[float],
        size: int,
        *,
        cache_dir: str | os.PathLike | None = None,
        name: str = "blend",
    ) -> None:
        if len(datasets) == 0:
            raise ValueError(f"{name}: BlendedDataset needs at least one dataset")
        if len(weights) != len(datasets):
            raise ValueError(f"{name}: {len(datasets)} datasets but {len(weights)} weights")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights, f"{name} weights")
        self.size = int(size)
        self.name = name
        if self.size < 0:
            raise ValueError(f"{name}: size must be >= 0, got {size}")

        def build() -> dict[str, np.ndarray]:
            di, dsi = build_blending_indices(self.weights, self.size)
            return {"dataset_index": di, "dataset_sample_index": dsi}

        self.cache_paths: dict[str, str] | None = None
        if cache_dir is not None:
            key = hashlib.blake2b(self.weights.tobytes(), digest_size=8).hexdigest()
            base = os.path.join(os.fspath(cache_dir), f"{name}_blend_{len(self.datasets)}ds_{self.size}ns_{key}")
            self.cache_paths = {k: f"{base}_{k}.npy" for k in ("dataset_index", "dataset_sample_index")}
            arrays = build_once_and_load(self.cache_paths, build)
        else:
            arrays = build()
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        self._check_sizes()

    def _check_sizes(self) -> None:
        """Every component must have the samples the blend takes from it."""
        if len(self.dataset_index) != self.size or len(self.dataset_sample_index) != self.size:
            where = self.cache_paths["dataset_index"] if self.cache_paths else self.name
            raise ValueError(
                f"{where}: blend indices hold {len(self.dataset_index)} samples, expected {self.size}; "
                "delete the cached files to rebuild"
            )
        needed = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for i, (ds, n) in enumerate(zip(self.datasets, needed)):
            if n > len(ds):
                raise ValueError(
                    f"{self.name}: the blend takes {n} samples from {_describe(ds, i)} but it has only "
                    f"{len(ds)}; build it with num_samples >= ceil(size * weight * {OVERSAMPLE})"
                )
        self.samples_per_dataset = needed

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self.cache_paths is not None:
            state.pop("dataset_index")
            state.pop("dataset_sample_index")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.cache_paths is not None:
            self.dataset_index = np.load(self.cache_paths["dataset_index"], mmap_mode="r")
            self.dataset_sample_index = np.load(self.cache_paths["dataset_sample_index"], mmap_mode="r")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> Any:
        """Sample ``idx`` of the blend: the chosen dataset's item, unchanged."""
        if not -self.size <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for {self.name} ({self.size} samples)")
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]
