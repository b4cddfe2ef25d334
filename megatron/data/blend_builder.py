"""Building BLOOM's train/valid/test blends from per-language datasets.

:func:`build_blended_datasets` opens every language's ``.bin``/``.idx``, splits its documents,
builds a :class:`~megatron.data.gpt_dataset.GPTDataset` per language and split, and blends
each split with :class:`~megatron.data.blended_dataset.BlendedDataset`.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from megatron.data.blend_weights import resolve_weights
from megatron.data.blended_dataset import OVERSAMPLE, BlendedDataset
from megatron.data.gpt_dataset import GPTDataset, split_documents
from megatron.data.indexed_dataset import MMapIndexedDataset

__all__ = ["BlendedDatasets", "build_blended_datasets"]

logger = logging.getLogger(__name__)


@dataclass
class BlendedDatasets:
    """What :func:`build_blended_datasets` returns.

    ``train``/``valid``/``test`` are None when no samples were requested (or no language has
    documents in that split). ``valid_per_language`` maps each language kept for validation to
    its own dataset of at least ``valid_samples`` samples, for per-language loss reports.
    """

    train: BlendedDataset | None
    valid: BlendedDataset | None
    test: BlendedDataset | None
    valid_per_language: dict[str, GPTDataset] = field(default_factory=dict)
    test_per_language: dict[str, GPTDataset] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)  # normalised train blend weights


def _as_spec(spec: Any, i: int) -> tuple[str, str, float | None]:
    """``(name, prefix, weight)`` from a tuple, a mapping or an object with those attributes."""
    if isinstance(spec, Mapping):
        get = spec.get
    elif isinstance(spec, (tuple, list)):
        if len(spec) != 3:
            raise ValueError(f"data.datasets[{i}]: expected (name, prefix, weight_or_None), got {spec!r}")
        return str(spec[0]), os.fspath(spec[1]), spec[2]
    else:
        get = lambda k, d=None: getattr(spec, k, d)  # noqa: E731
    name, prefix = get("name"), get("prefix")
    if name is None or prefix is None:
        raise ValueError(f"data.datasets[{i}]: needs a name and a prefix, got {spec!r}")
    return str(name), os.fspath(prefix), get("weight")


def _open(name: str, prefix: str) -> Any:
    """Open a language's ``.bin``/``.idx``, naming the language in any error."""
    try:
        return MMapIndexedDataset(prefix)
    except (OSError, ValueError) as e:
        raise type(e)(f"data.datasets[{name!r}]: cannot open {prefix}: {e}") from e


def _eval_split(
    kind: str,
    num_samples: int,
    names: list[str],
    datasets: list[Any],
    ranges: list[tuple[int, int]],
    weights: np.ndarray,
    seq_length: int,
    seed: int,
    cache_dir: str | None,
) -> tuple[BlendedDataset | None, dict[str, GPTDataset]]:
    """Per-language datasets and the blend of one evaluation split (valid or test).

    Languages whose split holds no tokens are skipped with a warning: small languages may have
    too few documents for a 5% split, which must not stop training. Each kept language gets at
    least ``num_samples`` samples, so any of them can be evaluated as long as the blend.
    """
    if num_samples <= 0:
        return None, {}
    kept: dict[str, GPTDataset] = {}
    kept_weights = []
    for name, ds, (start, end), w in zip(names, datasets, ranges, weights):
        tokens = int(np.asarray(ds.sizes[start:end]).sum(dtype=np.int64))
        if tokens == 0:
            warnings.warn(
                f"data.datasets[{name!r}]: the {kind} split has {end - start} documents and no tokens; "
                f"{name} is left out of {kind} (give it more documents or a larger {kind} share in data.split)",
                stacklevel=3,
            )
            continue
        # Scaling by the *global* weight keeps each language's sample count (hence its cache
        # files) independent of which other languages were skipped.
        needed = max(num_samples, math.ceil(num_samples * w * OVERSAMPLE))
        kept[name] = GPTDataset(kind, ds, np.arange(start, end), needed, seq_length, seed, cache_dir)
        kept_weights.append(w)
    if not kept:
        warnings.warn(f"no dataset has documents in the {kind} split; {kind} is disabled", stacklevel=3)
        return None, {}
    blend = BlendedDataset(list(kept.values()), kept_weights, num_samples, cache_dir=cache_dir, name=kind)
    return blend, kept


def build_blended_datasets(
    specs: Sequence[Any],
    seq_length: int,
    seed: int,
    split: str,
    train_samples: int,
    valid_samples: int,
    test_samples: int,
    alpha: float | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> BlendedDatasets:
    """Open every language, split its documents, and blend train, valid and test.

    Args:
        specs: ``(name, prefix, weight_or_None)`` per language (mappings or objects with
            ``name``/``prefix``/``weight`` work too). Give every language a weight, or none and
            an ``alpha``.
        seq_length, seed: sample length and shuffle seed of every :class:`GPTDataset`.
        split: ``"train,valid,test"`` document shares applied to each language
            (:func:`split_documents`).
        train_samples, valid_samples, test_samples: blend sizes (0 disables a split).
        alpha: if set, weights are :func:`alpha_sampling_weights` of each language's train
            tokens.
        cache_dir: where index caches go (default: next to each language's data).

    Each language's train dataset gets ``ceil(train_samples * weight * 1.005)`` samples (the
    0.5% margin keeps the greedy blend from running short). Languages with an empty valid or test
    split are warned about and left out of that split (its blend renormalises the remaining
    weights); an empty train split is an error. Index construction is collective when
    ``torch.distributed`` is initialised: every rank must call this with the same arguments.

    Raises:
        ValueError: bad specs (duplicate names, both or neither of weights/alpha, bad weights),
            a language whose train split has no tokens, a bad split string.
        FileNotFoundError: a missing ``.bin``/``.idx``; the message names the language.
    """
    if len(specs) == 0:
        raise ValueError("data.datasets is empty; list at least one (name, prefix, weight)")
    parsed = [_as_spec(s, i) for i, s in enumerate(specs)]
    names = [p[0] for p in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"data.datasets: duplicate names {duplicates}; names must be unique")
    for n, kind in ((train_samples, "train"), (valid_samples, "valid"), (test_samples, "test")):
        if n is None or n < 0:
            raise ValueError(f"{kind}_samples must be an integer >= 0, got {n!r}")
    cache = None if cache_dir is None else os.fspath(cache_dir)

    start = time.perf_counter()
    datasets = [_open(name, prefix) for name, prefix, _ in parsed]
    ranges = [split_documents(len(ds), split) for ds in datasets]
    train_tokens = [int(np.asarray(ds.sizes[r[0][0] : r[0][1]]).sum(dtype=np.int64)) for ds, r in zip(datasets, ranges)]
    weights = resolve_weights(names, [p[2] for p in parsed], train_tokens, alpha)

    train = None
    if train_samples > 0:
        parts = []
        for name, ds, r, tokens, w in zip(names, datasets, ranges, train_tokens, weights):
            if tokens == 0:
                raise ValueError(
                    f"data.datasets[{name!r}] ({ds.path_prefix}): the train split has {r[0][1] - r[0][0]} "
                    f"documents and no tokens (split {split!r} of {len(ds)} documents); give the "
                    "language more data or drop it from data.datasets"
                )
            n = math.ceil(train_samples * w * OVERSAMPLE)
            parts.append(GPTDataset("train", ds, np.arange(*r[0]), n, seq_length, seed, cache))
        train = BlendedDataset(parts, weights, train_samples, cache_dir=cache, name="train")

    valid, valid_per_language = _eval_split(
        "valid", valid_samples, names, datasets, [r[1] for r in ranges], weights, seq_length, seed, cache
    )
    test, test_per_language = _eval_split(
        "test", test_samples, names, datasets, [r[2] for r in ranges], weights, seq_length, seed, cache
    )
    heaviest = max(range(len(names)), key=lambda i: weights[i])
    lightest = min(range(len(names)), key=lambda i: weights[i])
    logger.info(
        "blend: %d datasets, %s train tokens, weights from %s %.4f to %s %.4f; index maps ready in %.1f s "
        "(logging.log_level=debug lists each dataset)", len(names), f"{sum(train_tokens):,}", names[heaviest],
        weights[heaviest], names[lightest], weights[lightest], time.perf_counter() - start,
    )
    for name, w, r, tokens in zip(names, weights, ranges, train_tokens):
        logger.debug(
            "%-12s weight %.4f  documents train/valid/test %d/%d/%d  train tokens %d",
            name, w, r[0][1] - r[0][0], r[1][1] - r[1][0], r[2][1] - r[2][0], tokens,
        )
    return BlendedDatasets(
        train=train,
        valid=valid,
        test=test,
        valid_per_language=valid_per_language,
        test_per_language=test_per_language,
        weights={n: float(w) for n, w in zip(names, weights)},
    )
