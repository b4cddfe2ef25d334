"""Megatron's memory-mapped indexed dataset (``MMIDIDX``): a ``.bin`` of token ids plus an
``.idx`` that says where each sequence starts.

The files are byte-compatible with Megatron-LM's ``MMapIndexedDataset`` (legacy
``megatron/data/indexed_dataset.py`` and Megatron-Core's ``IndexedDataset``), so datasets made
by either tool chain load here and the other way round.

``PREFIX.idx`` layout (little-endian, no padding; the header is 34 bytes)::

    offset  size     field
    0       9        magic  b"MMIDIDX\\x00\\x00"
    9       8        uint64 version, always 1
    17      1        uint8  dtype code of the token ids in .bin (see DTYPE_CODES)
    18      8        uint64 N, number of sequences
    26      8        uint64 D, number of entries of doc_idx (documents + 1)
    34      4*N      int32  sizes[N]      tokens per sequence
    34+4N   8*N      int64  pointers[N]   byte offset of each sequence in .bin
    34+12N  8*D      int64  doc_idx[D]    sequence index where each document starts;
                                          doc_idx[0] == 0, doc_idx[-1] == N

``PREFIX.bin`` is the sequences' token ids back to back, nothing else. One sequence per
document is what ``tools/preprocess_data.py`` writes (``doc_idx == 0..N``); Megatron allows
several sequences (sentences) per document, and so does this module.

Dtype codes are Megatron's. Codes 1-5 and 8 have always meant uint8, int8, int16, int32, int64
and uint16. Code 6 is float64 everywhere (the legacy table wrote ``np.float``, an alias of
Python's float, i.e. float64). Code 7 is float32 in Megatron-Core but ``np.double`` (float64)
in the legacy table; the legacy writer could not produce it (its float64 lookup stops at 6
and it had no float32), so files carrying 7 come from Megatron-Core and 7 is read as float32.
Token datasets only ever use uint16 (vocabularies < 65,500) or int32.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from megatron.errors import IndexedDatasetError, MissingIndexedDatasetError  # importable from here too
from megatron.utils.atomic import atomic_path, create_temporary

__all__ = [
    "HEADER_MAGIC",
    "HEADER_SIZE",
    "DTYPE_CODES",
    "IndexedDatasetError",
    "MissingIndexedDatasetError",
    "IndexedDatasetBuilder",
    "MMapIndexedDataset",
    "best_dtype",
    "dtype_code",
    "data_file_path",
    "index_file_path",
    "merge_datasets",
]

HEADER_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
# magic (9) + version (8) + dtype code (1) + N (8) + D (8)
HEADER_SIZE = len(HEADER_MAGIC) + 8 + 1 + 8 + 8
_LEGACY_MAGIC = b"TNTIDX\x00\x00"  # Megatron's non-mmap "lazy"/"cached" format

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}
_SIZES_DTYPE = np.dtype("<i4")
_INT64 = np.dtype("<i8")
_REBUILD_HINT = "re-run tools/preprocess_data.py to rebuild it"


def index_file_path(prefix: str | os.PathLike) -> str:
    """``PREFIX.idx``."""
    return os.fspath(prefix) + ".idx"


def data_file_path(prefix: str | os.PathLike) -> str:
    """``PREFIX.bin``."""
    return os.fspath(prefix) + ".bin"


def best_dtype(vocab_size: int | None) -> np.dtype:
    """Smallest id dtype Megatron uses for a vocabulary: uint16 below 65,500, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def dtype_code(dtype: np.dtype | type | str) -> int:
    """Megatron's code for ``dtype`` (uint16 -> 8, int32 -> 4, ...).

    Raises:
        ValueError: the dtype has no code (e.g. uint32, float16).
    """
    dt = np.dtype(dtype).newbyteorder("=")
    if dt not in _CODE_OF:
        names = ", ".join(str(d) for d in DTYPE_CODES.values())
        raise ValueError(f"dtype {dt} cannot be stored in an MMIDIDX dataset; use one of {names}")
    return _CODE_OF[dt]


def _le(dtype: np.dtype) -> np.dtype:
    """Little-endian version of ``dtype``: the on-disk byte order."""
    return np.dtype(dtype).newbyteorder("<")


class _Growable:
    """An int64 array with amortised O(1) append/extend (lists of Python ints are ~4x larger)."""

    def __init__(self, capacity: int = 1024) -> None:
        self._buf = np.empty(capacity, dtype=np.int64)
        self._n = 0

    def _reserve(self, extra: int) -> None:
        need = self._n + extra
        if need > len(self._buf):
            new = np.empty(max(need, 2 * len(self._buf)), dtype=np.int64)
            new[: self._n] = self._buf[: self._n]
            self._buf = new

    def append(self, value: int) -> None:
        self._reserve(1)
        self._buf[self._n] = value
        self._n += 1

    def extend(self, values: np.ndarray) -> None:
        self._reserve(len(values))
        self._buf[self._n : self._n + len(values)] = values
        self._n += len(values)

    def __len__(self) -> int:
        return self._n

    def last(self) -> int:
        return int(self._buf[self._n - 1])

    def view(self) -> np.ndarray:
        return self._buf[: self._n]


def _encode_index(dtype: np.dtype, sizes: np.ndarray, doc_idx: np.ndarray) -> bytes:
    """The complete ``.idx`` file contents for these sizes and document boundaries."""
    itemsize = np.dtype(dtype).itemsize
    sizes64 = np.asarray(sizes, dtype=np.int64)
    pointers = np.zeros(len(sizes64), dtype=np.int64)
    if len(sizes64) > 1:
        np.cumsum(sizes64[:-1] * itemsize, out=pointers[1:])
    header = HEADER_MAGIC + struct.pack("<QBQQ", _VERSION, dtype_code(dtype), len(sizes64), len(doc_idx))
    return b"".join(
        (
            header,
            sizes64.astype(_SIZES_DTYPE).tobytes(),
            pointers.astype(_INT64).tobytes(),
            np.asarray(doc_idx, dtype=_INT64).tobytes(),
        )
    )


class IndexedDatasetBuilder:
    """Writes a ``.bin``/``.idx`` pair, Megatron's ``MMapIndexedDatasetBuilder`` equivalent.

    Token ids go to a hidden temporary next to ``BIN_PATH`` as they arrive; :meth:`finalize`
    writes the index and only then renames both files to their real names, ``.idx`` last
    (megatron/utils/atomic.py's durability rule). A run that dies half-way leaves only hidden
    temporaries, never a pair that looks complete. Used as a context manager, an exception
    removes the temporary files::

        with IndexedDatasetBuilder("out_text_document.bin", np.uint16) as b:
            b.add_document([1, 2, 3])
            b.finalize("out_text_document.idx")
    """

    def __init__(self, bin_path: str | os.PathLike, dtype: np.dtype | type | str = np.int32,
                 partial_path: str | os.PathLike | None = None) -> None:
        """``partial_path``: write the ids there instead of a random hidden temporary, a name a
        resumable writer finds again after a crash (see :meth:`commit_point`, :meth:`restore`)."""
        self.bin_path = os.fspath(bin_path)
        self.dtype = np.dtype(dtype).newbyteorder("=")
        dtype_code(self.dtype)  # fail now, not at finalize
        self._disk_dtype = _le(self.dtype)
        if partial_path is None:
            fd, tmp = create_temporary(self.bin_path)
        else:
            tmp = os.fspath(partial_path)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        self._tmp_bin = os.fspath(tmp)
        self._file = os.fdopen(fd, "r+b" if partial_path is not None else "wb")
        self._sizes = _Growable()
        self._doc_idx = _Growable()
        self._doc_idx.append(0)
        self._finalized = False

    # -- context manager ---------------------------------------------------------------
    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._finalized:
            self.abort()

    # -- adding data -------------------------------------------------------------------
    def _as_ids(self, ids) -> np.ndarray:
        """``ids`` as a 1-D array of the builder's dtype, refusing values that do not fit."""
        if hasattr(ids, "numpy") and not isinstance(ids, np.ndarray):  # torch tensors
            ids = ids.detach().cpu().numpy()
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"{self.bin_path}: expected a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.dtype == self._disk_dtype:
            return arr
        if arr.size == 0:  # np.asarray([]) is float64; nothing to check
            return np.empty(0, dtype=self._disk_dtype)
        if self.dtype.kind in "iu":
            if arr.dtype.kind not in "iu":
                raise ValueError(f"{self.bin_path}: token ids must be integers, got dtype {arr.dtype}")
            info = np.iinfo(self.dtype)
            lo, hi = arr.min(), arr.max()
            if lo < info.min or hi > info.max:
                raise ValueError(
                    f"{self.bin_path}: token id {hi if hi > info.max else lo} does not fit {self.dtype}; "
                    "build with dtype=best_dtype(vocab_size) (int32 for vocabularies >= 65,500)"
                )
        return arr.astype(self._disk_dtype)

    def _check_open(self) -> None:
        if self._file is None or self._file.closed:
            raise ValueError(f"{self.bin_path}: builder already finalized or aborted")

    def add_item(self, ids) -> None:
        """Append one sequence (a 1-D array, list or CPU tensor of token ids)."""
        self._check_open()
        arr = np.ascontiguousarray(self._as_ids(ids))
        if len(arr) > np.iinfo(np.int32).max:
            raise ValueError(f"{self.bin_path}: a sequence of {len(arr)} tokens exceeds int32 sizes")
        self._file.write(memoryview(arr).cast("B"))
        self._sizes.append(len(arr))

    def end_document(self) -> None:
        """Close the current document: the sequences added since the last call form one."""
        self._check_open()
        self._doc_idx.append(len(self._sizes))

    def add_document(self, ids) -> None:
        """Append ``ids`` as a document made of one sequence (``add_item`` + ``end_document``)."""
        self.add_item(ids)
        self.end_document()

    def add_documents(self, flat_ids: np.ndarray, lengths: Sequence[int] | np.ndarray) -> None:
        """Append many one-sequence documents at once: ``flat_ids`` holds them back to back,
        ``lengths[i]`` tokens each. Writes the ids as one raw block (the preprocessing fast
        path: no per-document arrays)."""
        self._check_open()
        lengths = np.asarray(lengths, dtype=np.int64)
        arr = np.ascontiguousarray(self._as_ids(flat_ids))
        if lengths.ndim != 1 or (lengths < 0).any() or int(lengths.sum()) != len(arr):
            raise ValueError(
                f"{self.bin_path}: lengths (sum {int(lengths.sum())}) do not partition the "
                f"{len(arr)} ids given to add_documents"
            )
        if len(lengths) and lengths.max() > np.iinfo(np.int32).max:
            raise ValueError(f"{self.bin_path}: a sequence exceeds int32 sizes")
        self._file.write(memoryview(arr).cast("B"))
        first = len(self._sizes)
        self._sizes.extend(lengths)
        self._doc_idx.extend(np.arange(first + 1, first + 1 + len(lengths), dtype=np.int64))

    def merge_file_(self, other_prefix: str | os.PathLike) -> None:
        """Append every sequence and document of the dataset at ``other_prefix`` (validated
        first; its dtype must equal this builder's)."""
        self._check_open()
        other = MMapIndexedDataset(other_prefix)
        try:
            if other.dtype != self.dtype:
                raise IndexedDatasetError(
                    f"cannot merge {data_file_path(other_prefix)} ({other.dtype}) into "
                    f"{self.bin_path} ({self.dtype}); preprocess both with the same tokenizer/dtype"
                )
            offset = len(self._sizes)
            self._sizes.extend(other.sizes)
            self._doc_idx.extend(other.doc_idx[1:] + offset)
        finally:
            other.close()
        with open(data_file_path(other_prefix), "rb") as src:
            shutil.copyfileobj(src, self._file, length=16 << 20)

    # -- resuming (one-sequence documents, as preprocessing writes) ---------------------
    def commit_point(self) -> tuple[int, np.ndarray]:
        """Make everything added so far durable (flush + fsync); returns (bytes of ids written,
        sizes of the sequences written): what :meth:`restore` needs to continue from here."""
        self._check_open()
        self._file.flush()
        os.fsync(self._file.fileno())
        return self._file.tell(), self._sizes.view()

    def restore(self, nbytes: int, sizes: np.ndarray) -> None:
        """Continue a builder of one-sequence documents from a :meth:`commit_point`: ids after
        ``nbytes`` (written after that commit, before a crash) are cut off."""
        self._check_open()
        sizes = np.asarray(sizes, dtype=np.int64)
        if int(sizes.sum()) * self._disk_dtype.itemsize != nbytes:
            raise ValueError(f"{self._tmp_bin}: {len(sizes)} sizes summing to {int(sizes.sum())} ids do not make "
                             f"{nbytes} bytes of {self.dtype}")
        if os.fstat(self._file.fileno()).st_size < nbytes:
            raise ValueError(f"{self._tmp_bin} holds fewer than the {nbytes} committed bytes: it was truncated")
        self._file.truncate(nbytes)
        self._file.seek(nbytes)
        self._sizes.extend(sizes)
        self._doc_idx.extend(np.arange(1, len(sizes) + 1, dtype=np.int64))

    # -- finishing ---------------------------------------------------------------------
    @property
    def num_sequences(self) -> int:
        """Sequences written so far."""
        return len(self._sizes)

    @property
    def num_documents(self) -> int:
        """Documents closed so far."""
        return len(self._doc_idx) - 1

    def finalize(self, idx_path: str | os.PathLike) -> None:
        """Write the index and move both files to their final names (``.bin`` then ``.idx``).

        A trailing document that was never closed with :meth:`end_document` is closed here,
        so the index always satisfies ``doc_idx[-1] == N``.
        """
        self._check_open()
        idx_path = os.fspath(idx_path)
        if self._doc_idx.last() != len(self._sizes):
            self._doc_idx.append(len(self._sizes))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        try:
            with atomic_path(idx_path) as tmp_idx:
                with open(tmp_idx, "wb") as f:
                    f.write(_encode_index(self.dtype, self._sizes.view(), self._doc_idx.view()))
                # Drop a previous .idx first: a crash between the two renames must not pair the
                # new .bin with an old index. The .idx appears last, marking the pair complete.
                if os.path.lexists(idx_path):
                    os.remove(idx_path)
                os.replace(self._tmp_bin, self.bin_path)
        except BaseException:
            if os.path.exists(self._tmp_bin):
                os.remove(self._tmp_bin)
            raise
        self._finalized = True

    def abort(self) -> None:
        """Close and delete the temporary file; nothing is left under the final names."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        if not self._finalized and os.path.exists(self._tmp_bin):
            os.remove(self._tmp_bin)


def _fail(path: str, what: str) -> IndexedDatasetError:
    return IndexedDatasetError(f"{path}: {what}; the file is corrupt or incomplete, {_REBUILD_HINT}")


class MMapIndexedDataset:
    """Reads a ``.bin``/``.idx`` pair through ``mmap``; items are zero-copy numpy views.

    Opening validates the index against the format and the ``.bin`` size (see
    :class:`IndexedDatasetError`). With ``validate=False`` only the O(1) checks run (header,
    file sizes), skipping the O(N) pass over sizes, pointers and doc_idx: for very large,
    already-trusted datasets.

    Picklable (re-opens by path), so it can be handed to DataLoader worker processes.
    ``skip_warmup`` is accepted for Megatron's call signature ``MMapIndexedDataset(path,
    skip_warmup)`` and ignored: pages are read on demand, never pre-read.
    """

    def __init__(self, path_prefix: str | os.PathLike, skip_warmup: bool = True, *, validate: bool = True) -> None:
        del skip_warmup
        self._open(os.fspath(path_prefix), validate)

    def _open(self, prefix: str, validate: bool) -> None:
        self.path_prefix = prefix
        self._validate = validate
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise MissingIndexedDatasetError(
                    f"{p}: no such file (a dataset is a PREFIX.bin + PREFIX.idx pair; pass the "
                    f"prefix without extension, or {_REBUILD_HINT})"
                )
        dtype, n, d = self._read_header(idx_path)
        self._dtype = dtype
        self._idx_mmap = np.memmap(idx_path, mode="r", dtype=np.uint8)
        buf = memoryview(self._idx_mmap)
        self._sizes = np.frombuffer(buf, dtype=_SIZES_DTYPE, count=n, offset=HEADER_SIZE)
        self._pointers = np.frombuffer(buf, dtype=_INT64, count=n, offset=HEADER_SIZE + 4 * n)
        self._doc_idx = np.frombuffer(buf, dtype=_INT64, count=d, offset=HEADER_SIZE + 12 * n)
        if validate:
            self._check_index(idx_path)
        self._check_bin(bin_path)
        size = os.path.getsize(bin_path)
        # mmap refuses empty files; an empty dataset gets an empty buffer instead.
        self._bin_mmap = np.memmap(bin_path, mode="r", dtype=np.uint8) if size else np.empty(0, np.uint8)
        self._bin = memoryview(self._bin_mmap)

    @staticmethod
    def _read_header(idx_path: str) -> tuple[np.dtype, int, int]:
        """Validate the 34-byte header and the file size; return (dtype, N, D)."""
        file_size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            header = f.read(HEADER_SIZE)
        if header[: len(_LEGACY_MAGIC)] == _LEGACY_MAGIC:
            raise IndexedDatasetError(
                f"{idx_path}: this is Megatron's old non-mmap ('lazy'/'cached') index format, "
                f"which is not supported; {_REBUILD_HINT} (it writes the mmap format)"
            )
        magic = header[: len(HEADER_MAGIC)]
        if magic != HEADER_MAGIC[: len(magic)] or not magic:
            raise _fail(idx_path, f"bad magic {magic!r}, expected {HEADER_MAGIC!r} (not an MMIDIDX index)")
        if len(header) < HEADER_SIZE:
            raise _fail(idx_path, f"truncated header: {file_size} bytes, the header alone is {HEADER_SIZE}")
        version, code, n, d = struct.unpack("<QBQQ", header[len(HEADER_MAGIC) :])
        if version != _VERSION:
            raise _fail(idx_path, f"unsupported index version {version}, expected {_VERSION}")
        if code not in DTYPE_CODES:
            raise _fail(idx_path, f"unknown dtype code {code}, expected one of {sorted(DTYPE_CODES)}")
        expected = HEADER_SIZE + 12 * n + 8 * d
        # Megatron-Core's multimodal indexes append one int8 "mode" per sequence.
        if file_size not in (expected, expected + n):
            state = "truncated" if file_size < expected else "has trailing bytes"
            raise _fail(
                idx_path,
                f"{state}: header says N={n} sequences and D={d} doc_idx entries, which need "
                f"{expected} bytes, but the file has {file_size}",
            )
        if d < 1:
            raise _fail(idx_path, "doc_idx is empty; it must hold at least the leading 0")
        return DTYPE_CODES[code], n, d

    def _check_index(self, idx_path: str) -> None:
        """O(N) consistency of sizes, pointers and doc_idx."""
        sizes, pointers, doc_idx = self._sizes, self._pointers, self._doc_idx
        n = len(sizes)
        if n and sizes.min() < 0:
            bad = int(np.argmax(sizes < 0))
            raise _fail(idx_path, f"sizes[{bad}] = {sizes[bad]} is negative")
        expected = np.zeros(n, dtype=np.int64)
        if n > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self._dtype.itemsize, out=expected[1:])
        if not np.array_equal(pointers, expected):
            bad = int(np.argmax(pointers != expected))
            raise _fail(
                idx_path,
                f"pointers[{bad}] = {pointers[bad]} but the sizes before it put sequence {bad} at "
                f"byte {expected[bad]} (pointers must be the running sum of sizes x itemsize)",
            )
        if doc_idx[0] != 0:
            raise _fail(idx_path, f"doc_idx[0] = {doc_idx[0]}, must be 0")
        steps = np.diff(doc_idx)
        if len(steps) and steps.min() < 0:
            bad = int(np.argmax(steps < 0)) + 1
            raise _fail(
                idx_path,
                f"doc_idx is not monotonic: doc_idx[{bad}] = {doc_idx[bad]} < doc_idx[{bad - 1}] = {doc_idx[bad - 1]}",
            )
        if doc_idx[-1] != n:
            raise _fail(idx_path, f"doc_idx ends at {doc_idx[-1]}, must end at the sequence count N={n}")

    def _check_bin(self, bin_path: str) -> None:
        """The ``.bin`` must be exactly the bytes the index describes."""
        n = len(self._sizes)
        if self._validate:
            expected = int(self._sizes.sum(dtype=np.int64)) * self._dtype.itemsize
        else:  # O(1): last pointer + last size
            expected = int(self._pointers[-1]) + int(self._sizes[-1]) * self._dtype.itemsize if n else 0
        actual = os.path.getsize(bin_path)
        if actual != expected:
            state = "truncated" if actual < expected else "longer than its index"
            raise IndexedDatasetError(
                f"{bin_path}: {state}: the index describes {expected} bytes of {self._dtype} "
                f"tokens but the file has {actual}; the file is corrupt or incomplete, {_REBUILD_HINT}"
            )

    # -- pickling: reopen by path in the receiving process ------------------------------
    def __getstate__(self) -> dict:
        return {"path_prefix": self.path_prefix, "validate": False}

    def __setstate__(self, state: dict) -> None:
        self._open(state["path_prefix"], state["validate"])

    def close(self) -> None:
        """Release the memory maps. Views handed out earlier must not be used afterwards."""
        # Dropping our references unmaps once no outstanding view uses the buffers
        # (memoryview.release() would raise while any view exists).
        for name in ("_bin", "_bin_mmap", "_idx_mmap"):
            self.__dict__.pop(name, None)

    def __enter__(self) -> "MMapIndexedDataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- access ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._sizes)

    def __repr__(self) -> str:
        return (
            f"MMapIndexedDataset({self.path_prefix!r}, sequences={len(self)}, "
            f"documents={self.num_documents}, tokens={self.num_tokens}, dtype={self._dtype})"
        )

    @property
    def dtype(self) -> np.dtype:
        """Dtype of the token ids."""
        return self._dtype

    @property
    def sizes(self) -> np.ndarray:
        """Tokens per sequence (int32, read-only view of the index)."""
        return self._sizes

    @property
    def pointers(self) -> np.ndarray:
        """Byte offset of each sequence in ``.bin`` (int64)."""
        return self._pointers

    @property
    def doc_idx(self) -> np.ndarray:
        """Index of the first sequence of each document, plus N at the end (int64)."""
        return self._doc_idx

    @property
    def num_documents(self) -> int:
        """Number of documents (``len(doc_idx) - 1``)."""
        return len(self._doc_idx) - 1

    @property
    def num_tokens(self) -> int:
        """Total tokens in the dataset."""
        return int(self._sizes.sum(dtype=np.int64))

    def _index(self, idx: int) -> int:
        n = len(self._sizes)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {idx} out of range for {self.path_prefix} ({n} sequences)")
        return i

    def __getitem__(self, idx: int | slice) -> np.ndarray | list[np.ndarray]:
        """Sequence ``idx`` as a read-only array view of the ``.bin`` (a slice gives a list)."""
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices of an indexed dataset must be contiguous (step 1)")
            if stop <= start:
                return []
            total = int(self._sizes[start:stop].sum(dtype=np.int64))
            block = np.frombuffer(self._bin, dtype=self._dtype, count=total, offset=int(self._pointers[start]))
            return np.split(block, np.cumsum(self._sizes[start : stop - 1], dtype=np.int64))
        i = self._index(idx)
        return np.frombuffer(self._bin, dtype=self._dtype, count=int(self._sizes[i]), offset=int(self._pointers[i]))

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence ``idx`` (to its end when ``length``
        is None), as a zero-copy read-only view."""
        i = self._index(idx)
        size = int(self._sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"get({idx}, offset={offset}, length={length}) exceeds sequence of {size} tokens")
        start = int(self._pointers[i]) + offset * self._dtype.itemsize
        return np.frombuffer(self._bin, dtype=self._dtype, count=length, offset=start)

    def get_document(self, doc: int) -> np.ndarray:
        """All tokens of document ``doc`` (its sequences concatenated), as a zero-copy view."""
        n_docs = self.num_documents
        d = doc + n_docs if doc < 0 else doc
        if not 0 <= d < n_docs:
            raise IndexError(f"document index {doc} out of range for {self.path_prefix} ({n_docs} documents)")
        first, last = int(self._doc_idx[d]), int(self._doc_idx[d + 1])
        if first == last:
            return np.empty(0, dtype=self._dtype)
        count = int(self._sizes[first:last].sum(dtype=np.int64))
        return np.frombuffer(self._bin, dtype=self._dtype, count=count, offset=int(self._pointers[first]))

    @staticmethod
    def exists(path_prefix: str | os.PathLike) -> bool:
        """True when both ``PREFIX.idx`` and ``PREFIX.bin`` exist (contents not checked)."""
        return os.path.isfile(index_file_path(path_prefix)) and os.path.isfile(data_file_path(path_prefix))


def merge_datasets(prefixes: Iterable[str | os.PathLike], out_prefix: str | os.PathLike) -> str:
    """Concatenate datasets (same dtype, in the given order) into ``out_prefix``.

    The result is byte-identical to building one dataset from all their documents in order.
    Returns ``out_prefix``.

    Raises:
        ValueError: no input prefixes, or an input is also the output.
        IndexedDatasetError: an input is missing/corrupt, or dtypes differ.
    """
    prefixes = [os.fspath(p) for p in prefixes]
    out_prefix = os.fspath(out_prefix)
    if not prefixes:
        raise ValueError("merge_datasets: no input datasets given")
    out_abs = Path(out_prefix).resolve()
    if any(Path(p).resolve() == out_abs for p in prefixes):
        raise ValueError(f"merge_datasets: output prefix {out_prefix} is also an input")
    with MMapIndexedDataset(prefixes[0], validate=False) as first:
        dtype = first.dtype
    with IndexedDatasetBuilder(data_file_path(out_prefix), dtype) as builder:
        for p in prefixes:
            builder.merge_file_(p)
        builder.finalize(index_file_path(out_prefix))
    return out_prefix
