"""Checking a checkpoint file's pickle before anything unpickles it with ``weights_only=False``.

DeepSpeed's ``load_checkpoint`` (and its universal converter) read every ``.pt`` file with
``torch.load(weights_only=False)``, because the files hold more than tensors: DeepSpeed's
optimizer metadata, Megatron-DeepSpeed's ``argparse.Namespace`` of arguments, NumPy random
states. Unpickling runs whatever callables the pickle names, so a published checkpoint (BLOOM's
intermediate ones, a colleague's) is untrusted input. :func:`scan_file` checks a file without
running any of it:

1. the pickle's global names, read statically (``torch.serialization.get_unsafe_globals_in_checkpoint``
   walks the opcodes, it imports nothing), must all be in :data:`ALLOWED_GLOBALS`;
2. the file must then load with torch's restricted ``weights_only`` unpickler under exactly that
   allow-list (memory-mapped: the tensors' data is not read), which also refuses calls the
   static walk cannot judge.

A file that fails is refused with :class:`~megatron.errors.UntrustedCheckpointError` naming the
file and the types. :func:`safe_load` is the same restricted load, for code of ours that reads
checkpoint metadata (the universal converter), so nothing of ours ever needs ``weights_only=False``.
"""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from megatron import enums
from megatron.errors import UntrustedCheckpointError


def _allowed_globals() -> dict[str, Any]:
    """Every non-torch type a Megatron-DeepSpeed, DeepSpeed or our checkpoint pickles, by the
    name the pickle uses (NumPy 1 and 2 name their reconstructors differently)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    allowed: dict[str, Any] = {
        # Megatron-DeepSpeed's client state: its arguments (with Megatron's enums in them).
        "argparse.Namespace": argparse.Namespace,
        **{f"megatron.enums.{cls.__name__}": cls
           for cls in (enums.LayerType, enums.AttnType, enums.AttnMaskType, enums.PositionEmbeddingType)},
        # NumPy's random state (np.random.get_state(): a uint32 array) in every rank's RNG state.
        "numpy.ndarray": np.ndarray,
        "numpy.dtype": np.dtype,
        "numpy._core.multiarray._reconstruct": reconstruct,
        "numpy.core.multiarray._reconstruct": reconstruct,
        "numpy._core.multiarray.scalar": scalar,
        "numpy.core.multiarray.scalar": scalar,
        # DeepSpeed's ZeRO / BF16_Optimizer state.
        "deepspeed.runtime.zero.config.ZeroStageEnum": ZeroStageEnum,
        "deepspeed.runtime.fp16.loss_scaler.LossScaler": LossScaler,
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": DynamicLossScaler,
        "deepspeed.utils.tensor_fragment.fragment_address": fragment_address,
    }
    for dtype in (np.uint32, np.int64, np.float64, np.float32, np.int32, np.uint8, np.bool_):
        dtype_class = type(np.dtype(dtype))  # numpy.dtypes.UInt32DType ... (NumPy >= 1.25)
        allowed[f"{dtype_class.__module__}.{dtype_class.__name__}"] = dtype_class
    return allowed


@functools.lru_cache(maxsize=1)  # built once per process: importing DeepSpeed's modules takes a moment
def allowed_globals() -> dict[str, Any]:
    """The allow-list: pickle global name -> the object it may resolve to."""
    return _allowed_globals()


def _safe_globals():
    return torch.serialization.safe_globals([(obj, name) for name, obj in allowed_globals().items()])


def safe_load(path: str | os.PathLike, mmap: bool = True) -> Any:
    """``torch.load`` of ``path`` with the restricted unpickler and the allow-list, after the
    static check; memory-mapped by default (tensors are read when touched). Raises
    :class:`UntrustedCheckpointError` naming the file and what it holds."""
    path = Path(path)
    _check_globals(path)
    try:
        with _safe_globals():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ValueError ...
        raise UntrustedCheckpointError(
            f"{path} does not load with the restricted unpickler ({type(exc).__name__}: {str(exc)[:400]}); "
            "it is corrupt or holds objects a checkpoint does not hold: it was not loaded") from None


def scan_file(path: str | os.PathLike) -> None:
    """Refuse ``path`` (raise :class:`UntrustedCheckpointError`) unless its pickle holds only
    tensors and allowed types; nothing in it runs."""
    safe_load(path, mmap=True)


def scan_files(paths: Iterable[str | os.PathLike]) -> int:
    """:func:`scan_file` on each path; returns how many were scanned."""
    count = 0
    for path in paths:
        scan_file(path)
        count += 1
    return count


def _check_globals(path: Path) -> None:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:  # noqa: BLE001 - not a zip archive, truncated ...
        raise UntrustedCheckpointError(f"{path} is not a readable torch.save archive ({exc}): it was not loaded") \
            from None
    refused = sorted(name for name in names if name not in allowed_globals())
    if refused:
        raise UntrustedCheckpointError(
            f"{path} pickles {', '.join(refused)}: no Megatron-DeepSpeed, DeepSpeed or BLOOM checkpoint holds "
            "such objects, and unpickling would run them, so the file was not loaded. Get the checkpoint from its "
            "source again; if you wrote it yourself with extra client state, store plain values instead")
