"""Test helpers for the data pipeline: an in-memory indexed dataset and brute-force references."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np


class InMemoryIndexedDataset:
    """The indexed-dataset protocol (``sizes``, ``doc_idx``, ``get``, ``len``) over numpy arrays.

    ``path_prefix`` is optional: set it to exercise the cache next to "the data".
    """

    def __init__(self, docs: Sequence[np.ndarray], path_prefix: str | None = None, dtype=np.int32) -> None:
        self.dtype = np.dtype(dtype)
        self._docs = [np.asarray(d, dtype=self.dtype) for d in docs]
        self.sizes = np.array([len(d) for d in self._docs], dtype=np.int32)
        self.doc_idx = np.arange(len(self._docs) + 1, dtype=np.int64)
        if path_prefix is not None:
            self.path_prefix = path_prefix

    def __len__(self) -> int:
        return len(self._docs)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        doc = self._docs[idx]
        if length is None:
            length = len(doc) - offset
        assert 0 <= offset and offset + length <= len(doc), (idx, offset, length, len(doc))
        view = doc[offset : offset + length]
        view.flags.writeable = False  # like the mmap reader: callers must not write into it
        return view


def random_docs(seed: int, num_docs: int, min_len: int = 1, max_len: int = 50, vocab: int = 50_000) -> list[np.ndarray]:
    """``num_docs`` documents of random length and random token ids (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, size=num_docs)
    return [rng.integers(0, vocab, size=n).astype(np.int32) for n in lengths]


def reference_sample(docs: Sequence[np.ndarray], doc_idx: np.ndarray, seq_length: int, sample: int) -> np.ndarray:
    """Sample ``sample`` (before shuffling) by brute force: concatenate the epoch stream and
    slice tokens ``[sample * seq_length, (sample + 1) * seq_length]``."""
    stream = np.concatenate([docs[d] for d in doc_idx]).astype(np.int64)
    return stream[sample * seq_length : (sample + 1) * seq_length + 1]


def reference_stream(docs: Sequence[np.ndarray], doc_idx: np.ndarray) -> np.ndarray:
    """The concatenated token stream of ``doc_idx``."""
    return np.concatenate([docs[d] for d in doc_idx]).astype(np.int64)


def write_indexed_dataset(prefix: str | os.PathLike, docs: Sequence[np.ndarray], dtype=np.uint16) -> str:
    """Write ``docs`` as a real ``PREFIX.bin``/``PREFIX.idx`` pair with the project's builder."""
    from megatron.data.indexed_dataset import IndexedDatasetBuilder

    prefix = os.fspath(prefix)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for d in docs:
        builder.add_document(np.asarray(d))
    builder.finalize(prefix + ".idx")
    return prefix
