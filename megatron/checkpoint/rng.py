"""Every random stream of one rank, captured for a checkpoint and put back on resume.

Keys are Megatron's (``random_rng_state``, ``np_rng_state``, ``torch_rng_state``,
``cuda_rng_state``, ``rng_tracker_states``), and, as in Megatron-DeepSpeed, the states of all
data-parallel ranks are gathered into one list stored in the model-parallel rank's
``mp_rank_XX_model_states.pt`` (DeepSpeed writes that file from data-parallel rank 0 only).
"""

from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.core.tensor_parallel import MODEL_PARALLEL_RNG, RNGStatesTracker, model_parallel_seed


def capture_rng_state(tracker: Optional[RNGStatesTracker]) -> dict[str, Any]:
    """This rank's Python, NumPy, torch (CPU and current GPU) and tensor-parallel tracker states."""
    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": tracker.get_states() if tracker is not None else None,
    }


def restore_rng_state(state: dict[str, Any], tracker: Optional[RNGStatesTracker]) -> None:
    """Put back what :func:`capture_rng_state` returned, so the next draw is the saved run's."""
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if state.get("cuda_rng_state") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    if tracker is not None and state.get("rng_tracker_states") is not None:
        tracker.set_states(state["rng_tracker_states"])


def gather_data_parallel(state: dict[str, Any], group, size: int) -> list[dict[str, Any]]:
    """The states of every data-parallel rank of this rank's group, in DP-rank order."""
    if size == 1:
        return [state]
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, state, group=group)
    return gathered


def reseed(seed: int, iteration: int, tracker: Optional[RNGStatesTracker], tp_rank: int, pp_rank: int) -> None:
    """Fresh streams derived from (seed, iteration), for a resume on a different layout, where the
    saved per-rank streams have no counterpart."""
    derived = seed + iteration
    default, model_parallel = model_parallel_seed(derived, tp_rank, pp_rank)
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(default)  # per pipeline stage, as at the start of a run
    if tracker is not None:
        tracker.reset()
        tracker.add(MODEL_PARALLEL_RNG, model_parallel)
