"""MMIDIDX .bin/.idx: exact bytes, round trips, merging, and every validation error."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from megatron.data.indexed_dataset import (
    DTYPE_CODES,
    HEADER_SIZE,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    MissingIndexedDatasetError,
    MMapIndexedDataset,
    best_dtype,
    dtype_code,
    merge_datasets,
)


def build(prefix: Path, docs, dtype=np.uint16) -> str:
    """Write one single-sequence document per entry of ``docs``; return the prefix."""
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype)
    for d in docs:
        b.add_document(d)
    b.finalize(f"{prefix}.idx")
    return str(prefix)


# Two documents [1, 2, 3] and [4, 5] as uint16, written out field by field.
EXPECTED_IDX = (
    b"MMIDIDX\x00\x00"  # magic, 9 bytes
    + struct.pack("<Q", 1)  # version
    + struct.pack("<B", 8)  # dtype code: uint16
    + struct.pack("<Q", 2)  # N sequences
    + struct.pack("<Q", 3)  # D doc_idx entries
    + struct.pack("<2i", 3, 2)  # sizes
    + struct.pack("<2q", 0, 6)  # byte pointers: 3 tokens x 2 bytes
    + struct.pack("<3q", 0, 1, 2)  # doc_idx
)
EXPECTED_BIN = struct.pack("<5H", 1, 2, 3, 4, 5)


def test_idx_bytes_match_hand_checked_example(tmp_path):
    prefix = build(tmp_path / "a", [[1, 2, 3], [4, 5]])
    assert Path(prefix + ".idx").read_bytes() == EXPECTED_IDX
    assert Path(prefix + ".bin").read_bytes() == EXPECTED_BIN
    assert len(EXPECTED_IDX) == HEADER_SIZE + 12 * 2 + 8 * 3 == 82


def test_reader_on_hand_written_files(tmp_path):
    (tmp_path / "h.idx").write_bytes(EXPECTED_IDX)
    (tmp_path / "h.bin").write_bytes(EXPECTED_BIN)
    ds = MMapIndexedDataset(tmp_path / "h")
    assert len(ds) == 2 and ds.num_documents == 2 and ds.num_tokens == 5
    assert ds.dtype == np.uint16
    assert ds.sizes.dtype == np.int32 and ds.doc_idx.dtype == np.int64 and ds.pointers.dtype == np.int64
    assert ds[0].tolist() == [1, 2, 3] and ds[1].tolist() == [4, 5] and ds[-1].tolist() == [4, 5]
    assert ds.pointers.tolist() == [0, 6] and ds.doc_idx.tolist() == [0, 1, 2]


def test_megatron_dtype_codes():
    assert {c: str(d) for c, d in DTYPE_CODES.items()} == {
        1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float32", 8: "uint16"
    }
    assert dtype_code(np.uint16) == 8 and dtype_code("int32") == 4 and dtype_code(np.float64) == 6
    with pytest.raises(ValueError, match="uint32"):
        dtype_code(np.uint32)


def test_best_dtype():
    assert best_dtype(4096) == np.uint16 and best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32 and best_dtype(250680) == np.int32 and best_dtype(None) == np.int32


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64])
def test_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    hi = min(np.iinfo(dtype).max, 250_000)
    docs = [rng.integers(0, hi, size=n).astype(dtype) for n in (5, 1, 17, 0, 300)]
    ds = MMapIndexedDataset(build(tmp_path / "rt", docs, dtype))
    assert len(ds) == len(docs) and ds.dtype == dtype
    assert ds.sizes.tolist() == [len(d) for d in docs]
    for i, d in enumerate(docs):
        assert np.array_equal(ds[i], d)
        assert np.array_equal(ds.get_document(i), d)
    assert np.array_equal(ds.get(4, offset=10, length=5), docs[4][10:15])
    assert np.array_equal(ds.get(4, offset=290), docs[4][290:])
    assert [a.tolist() for a in ds[1:3]] == [docs[1].tolist(), docs[2].tolist()]


def test_items_are_zero_copy_read_only_views(tmp_path):
    ds = MMapIndexedDataset(build(tmp_path / "v", [[7, 8, 9]]))
    item = ds[0]
    assert not item.flags.owndata and not item.flags.writeable
    with pytest.raises(ValueError):
        item[0] = 1


def test_index_errors(tmp_path):
    ds = MMapIndexedDataset(build(tmp_path / "e", [[1, 2]]))
    with pytest.raises(IndexError):
        ds[1]
    with pytest.raises(IndexError):
        ds.get(0, offset=1, length=2)
    with pytest.raises(IndexError):
        ds.get_document(1)


def test_several_sequences_per_document(tmp_path):
    b = IndexedDatasetBuilder(tmp_path / "s.bin", np.int32)
    b.add_item([1, 2])
    b.add_item([3])
    b.end_document()
    b.end_document()  # an empty document, as Megatron's builder can write
    b.add_item([4])  # a trailing document never closed: finalize closes it
    b.finalize(tmp_path / "s.idx")
    ds = MMapIndexedDataset(tmp_path / "s")
    assert ds.doc_idx.tolist() == [0, 2, 2, 3]
    assert ds.get_document(0).tolist() == [1, 2, 3] and ds.get_document(1).size == 0
    assert ds.get_document(2).tolist() == [4]


def test_add_documents_fast_path_is_byte_identical(tmp_path):
    docs = [[1, 2, 3], [4], [5, 6]]
    build(tmp_path / "slow", docs)
    b = IndexedDatasetBuilder(tmp_path / "fast.bin", np.uint16)
    b.add_documents(np.array([1, 2, 3, 4], np.uint16), [3, 1])
    b.add_documents(np.array([5, 6], np.uint16), np.array([2], np.int32))
    b.finalize(tmp_path / "fast.idx")
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"fast{ext}").read_bytes() == (tmp_path / f"slow{ext}").read_bytes()
    with pytest.raises(ValueError, match="partition"):
        IndexedDatasetBuilder(tmp_path / "bad.bin", np.uint16).add_documents(np.arange(3), [2, 2])


def test_ids_that_do_not_fit_are_refused(tmp_path):
    b = IndexedDatasetBuilder(tmp_path / "o.bin", np.uint16)
    with pytest.raises(ValueError, match="does not fit uint16"):
        b.add_item([1, 70000])
    with pytest.raises(ValueError, match="1-D"):
        b.add_item([[1, 2]])
    b.abort()


def test_empty_dataset(tmp_path):
    ds = MMapIndexedDataset(build(tmp_path / "empty", []))
    assert len(ds) == 0 and ds.num_documents == 0 and ds.doc_idx.tolist() == [0]


def test_merge_equals_building_the_concatenation(tmp_path):
    a_docs, b_docs = [[1, 2, 3], [4, 5]], [[6], [7, 8, 9, 10], [11]]
    a = build(tmp_path / "a", a_docs)
    b = build(tmp_path / "b", b_docs)
    build(tmp_path / "ab", a_docs + b_docs)
    merge_datasets([a, b], tmp_path / "merged")
    builder = IndexedDatasetBuilder(tmp_path / "merged2.bin", np.uint16)
    builder.merge_file_(a)
    builder.merge_file_(b)
    builder.finalize(tmp_path / "merged2.idx")
    for name in ("merged", "merged2"):
        for ext in (".bin", ".idx"):
            assert (tmp_path / f"{name}{ext}").read_bytes() == (tmp_path / f"ab{ext}").read_bytes()


def test_merge_refuses_other_dtype(tmp_path):
    a = build(tmp_path / "a", [[1]], np.uint16)
    b = build(tmp_path / "b", [[1]], np.int32)
    with pytest.raises(IndexedDatasetError, match="cannot merge"):
        merge_datasets([a, b], tmp_path / "m")
    assert not MMapIndexedDataset.exists(tmp_path / "m")
    assert not list(tmp_path.glob("m.*"))


def test_unfinished_build_leaves_no_final_files(tmp_path):
    b = IndexedDatasetBuilder(tmp_path / "x.bin", np.uint16)
    b.add_document([1, 2, 3])  # the process "dies" here: no finalize
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "x.idx").exists()
    assert not MMapIndexedDataset.exists(tmp_path / "x")
    b.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(tmp_path / "y.bin", np.uint16) as b2:
            b2.add_document([1])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_finalize_replaces_previous_files(tmp_path):
    build(tmp_path / "r", [[1, 2, 3], [4]])
    build(tmp_path / "r", [[9]])
    assert MMapIndexedDataset(tmp_path / "r")[0].tolist() == [9]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.bin", "r.idx"]


def test_pickle_reopens_by_path(tmp_path):
    ds = MMapIndexedDataset(build(tmp_path / "p", [[1, 2], [3]]))
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[1].tolist() == [3] and clone.path_prefix == ds.path_prefix


# -- validation: each corruption raises IndexedDatasetError naming the file ----------------
def _patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _truncate(path: Path, nbytes: int) -> None:
    path.write_bytes(path.read_bytes()[:-nbytes])


N3 = 3  # sequences in the corrupted fixture
SIZES_AT, POINTERS_AT, DOC_IDX_AT = HEADER_SIZE, HEADER_SIZE + 4 * N3, HEADER_SIZE + 12 * N3

CORRUPTIONS = {
    "bad magic": ("idx", lambda p: _patch(p, 0, b"XXIDIDX"), "bad magic"),
    "legacy magic": ("idx", lambda p: _patch(p, 0, b"TNTIDX\x00\x00"), "old non-mmap"),
    "bad version": ("idx", lambda p: _patch(p, 9, struct.pack("<Q", 2)), "version 2"),
    "bad dtype": ("idx", lambda p: _patch(p, 17, b"\x09"), "dtype code 9"),
    "truncated idx": ("idx", lambda p: _truncate(p, 8), "truncated"),
    "truncated header": ("idx", lambda p: p.write_bytes(p.read_bytes()[:20]), "truncated header"),
    "trailing idx bytes": ("idx", lambda p: p.write_bytes(p.read_bytes() + b"\x00" * 5), "trailing bytes"),
    "huge N": ("idx", lambda p: _patch(p, 18, struct.pack("<Q", 10**12)), "truncated"),
    "truncated bin": ("bin", lambda p: _truncate(p, 2), "truncated"),
    "longer bin": ("bin", lambda p: p.write_bytes(p.read_bytes() + b"\x00\x00"), "longer than its index"),
    "inconsistent pointers": ("idx", lambda p: _patch(p, POINTERS_AT + 8, struct.pack("<q", 4)), "pointers[1]"),
    "negative size": ("idx", lambda p: _patch(p, SIZES_AT, struct.pack("<i", -1)), "negative"),
    "non-monotonic doc_idx": ("idx", lambda p: _patch(p, DOC_IDX_AT + 8, struct.pack("<2q", 2, 1)), "not monotonic"),
    "doc_idx not from 0": ("idx", lambda p: _patch(p, DOC_IDX_AT, struct.pack("<q", 1)), "doc_idx[0]"),
    "doc_idx not ending at N": ("idx", lambda p: _patch(p, DOC_IDX_AT + 24, struct.pack("<q", 2)), "must end"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_is_detected_and_names_the_file(tmp_path, name):
    which, corrupt, words = CORRUPTIONS[name]
    prefix = build(tmp_path / "c", [[1, 2, 3], [4, 5], [6]])
    target = Path(f"{prefix}.{which}")
    corrupt(target)
    with pytest.raises(IndexedDatasetError) as info:
        MMapIndexedDataset(prefix)
    msg = str(info.value)
    assert str(target) in msg, msg
    assert words in msg, msg
    assert "preprocess_data.py" in msg, msg  # says how to fix it
    assert isinstance(info.value, ValueError)


def test_missing_files(tmp_path):
    prefix = build(tmp_path / "m", [[1]])
    os.remove(f"{prefix}.bin")
    assert not MMapIndexedDataset.exists(prefix)
    with pytest.raises(MissingIndexedDatasetError, match=r"m\.bin: no such file") as info:
        MMapIndexedDataset(prefix)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, IndexedDatasetError)


def test_quick_open_still_checks_sizes(tmp_path):
    prefix = build(tmp_path / "q", [[1, 2, 3], [4]])
    assert len(MMapIndexedDataset(prefix, validate=False)) == 2
    _truncate(Path(prefix + ".bin"), 2)
    with pytest.raises(IndexedDatasetError, match="truncated"):
        MMapIndexedDataset(prefix, validate=False)
