"""Blend weights: validating explicit weights, and XLM/BLOOM alpha (temperature) sampling.

:func:`alpha_sampling_weights` is ``p_i^alpha / sum_j p_j^alpha`` over each dataset's share of
tokens; :func:`resolve_weights` applies the config's rule that a blend has either a weight per
dataset or an ``alpha``, never both.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np

from megatron.errors import DataError

__all__ = ["alpha_sampling_weights", "normalize_weights", "resolve_weights"]


def normalize_weights(weights: Sequence[float], what: str = "weights") -> np.ndarray:
    """``weights / sum(weights)`` as float64, after checking they are finite and > 0."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0:
        raise ValueError(f"{what}: need a non-empty list of weights, got {weights!r}")
    bad = np.flatnonzero(~np.isfinite(w) | (w <= 0))
    if len(bad):
        raise ValueError(
            f"{what}[{bad[0]}] = {w[bad[0]]}: every weight must be finite and > 0 "
            "(drop the dataset instead of giving it weight 0)"
        )
    return w / w.sum()


def alpha_sampling_weights(token_counts: Sequence[int] | np.ndarray, alpha: float) -> np.ndarray:
    """Temperature-sampling weights ``q_i = p_i^alpha / sum_j p_j^alpha`` with ``p_i = n_i / sum n``.

    ``alpha = 1`` samples in proportion to size, ``alpha = 0`` uniformly; BLOOM/XLM use values in
    between to up-sample low-resource languages.

    Args:
        token_counts: tokens per dataset (each > 0).
        alpha: exponent, finite and >= 0.

    Raises:
        ValueError: empty counts, a count that is negative, zero or not finite, or a bad alpha.
    """
    n = np.asarray(token_counts, dtype=np.float64)
    if n.ndim != 1 or len(n) == 0:
        raise ValueError(f"alpha_sampling_weights: need a non-empty list of token counts, got {token_counts!r}")
    bad = np.flatnonzero(~np.isfinite(n) | (n <= 0))
    if len(bad):
        raise ValueError(
            f"alpha_sampling_weights: token_counts[{bad[0]}] = {n[bad[0]]}; every dataset needs a "
            "positive token count (drop empty datasets from the blend)"
        )
    if isinstance(alpha, bool) or not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha_sampling_weights: alpha must be a finite number >= 0, got {alpha!r}")
    q = (n / n.sum()) ** float(alpha)
    return q / q.sum()


def resolve_weights(
    names: list[str], weights: list[float | None], train_tokens: list[int], alpha: float | None
) -> np.ndarray:
    """Explicit weights or alpha sampling over train tokens: exactly one of the two."""
    given = [w is not None for w in weights]
    if any(given) and not all(given):
        missing = [n for n, g in zip(names, given) if not g]
        raise DataError(
            f"data.datasets: weights are missing for {missing}; give every dataset a weight, "
            "or none and set data.alpha"
        )
    if all(given) and alpha is not None:
        raise DataError(
            "data.alpha and per-dataset weights are both set; use one of them "
            "(set data.alpha: null or drop the weights)"
        )
    if not all(given) and alpha is None:
        raise DataError("data.datasets have no weights and data.alpha is not set; give weights or an alpha (e.g. 0.3)")
    if alpha is not None:
        empty = [n for n, t in zip(names, train_tokens) if t == 0]
        if empty:
            raise DataError(f"data.datasets {empty}: no training tokens, cannot compute alpha-sampling weights: "
                            "drop them or give every dataset a weight")
        return alpha_sampling_weights(train_tokens, alpha)
    for n, w in zip(names, weights):
        if isinstance(w, bool) or not (isinstance(w, numbers.Real) and math.isfinite(w) and w > 0):
            raise DataError(f"data.datasets[{n!r}].weight = {w!r}: must be a finite number > 0")
    return normalize_weights([float(w) for w in weights])  # type: ignore[arg-type]
