"""GPTDataset: document/sample/shuffle indices, sample contents, cache and split rules."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from data_helpers import InMemoryIndexedDataset, random_docs, reference_stream, write_indexed_dataset
from megatron.data import gpt_dataset
from megatron.data.gpt_dataset import (
    GPTDataset,
    build_index_mappings,
    build_sample_idx,
    index_cache_paths,
    num_epochs_for,
    split_documents,
)

# ---------------------------------------------------------------------------------------------
# split_documents
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_docs, split, expected",
    [
        (1000, "0.95,0.05,0", [(0, 950), (950, 1000), (1000, 1000)]),
        (1000, "969, 30, 1", [(0, 969), (969, 999), (999, 1000)]),
        (1000, "949/50/1", [(0, 949), (949, 999), (999, 1000)]),
        (10, "9,1", [(0, 9), (9, 10), (10, 10)]),  # missing test weight counts as 0
        (10, "1", [(0, 10), (10, 10), (10, 10)]),
        # 10/3 = 3.33 -> 3 each, sum 9: diff -1 moves every end boundary one to the right
        (10, "1,1,1", [(0, 4), (4, 7), (7, 10)]),
        # round(2.5) = 2 (half to even) twice, round(5) = 5: sum 9, diff -1
        (10, "0.25,0.25,0.5", [(0, 3), (3, 5), (5, 10)]),
        # round(1.5) = 2 twice: sum 4, diff +1 takes one document off every end boundary
        (3, "0.5,0.5,0", [(0, 1), (1, 3), (3, 3)]),
        (0, "0.95,0.05,0", [(0, 0), (0, 0), (0, 0)]),
        # Megatron's rule gives [0, -1, 1, 3] here; boundaries are clamped into range
        (3, "0,0.5,0.5", [(0, 0), (0, 1), (1, 3)]),
    ],
)
def test_split_documents_hand_computed(num_docs, split, expected):
    assert split_documents(num_docs, split) == expected


@pytest.mark.parametrize("bad", ["", "a,b,c", "0.9,-0.1,0.2", "0,0,0", "1,1,1,1", "0.9;0.1", "nan,1,0"])
def test_split_documents_rejects_bad_strings(bad):
    with pytest.raises(ValueError, match="data.split"):
        split_documents(100, bad)


def test_split_documents_covers_everything():
    for n in range(0, 60):
        for split in ("0.95,0.05,0", "1,1,1", "8,1,1", "0.333,0.333,0.334", "1,0,0"):
            ranges = split_documents(n, split)
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a <= b for a, b in ranges)
            assert ranges[0][1] == ranges[1][0] and ranges[1][1] == ranges[2][0]


# ---------------------------------------------------------------------------------------------
# Index construction against straightforward references
# ---------------------------------------------------------------------------------------------


def loop_num_epochs(tokens_per_epoch, seq_length, num_samples):
    epochs, total = 0, 0
    while True:
        epochs += 1
        total += tokens_per_epoch
        if (total - 1) // seq_length >= num_samples:
            return epochs


def loop_sample_idx(sizes, doc_idx, seq_length):
    """Walk the stream one sample at a time, as Megatron's C++ helper does."""
    total = int(sum(sizes[d] for d in doc_idx))
    num_samples = (total - 1) // seq_length
    rows = [(0, 0)]
    k, offset = 0, 0
    for _ in range(num_samples):
        remaining = seq_length + 1
        while remaining:
            left = int(sizes[doc_idx[k]]) - offset
            remaining -= left
            if remaining <= 0:
                offset += remaining + left - 1  # stay on the sample's last token
                remaining = 0
            else:
                k, offset = k + 1, 0
        rows.append((k, offset))
    return np.array(rows, dtype=np.int64)


def test_num_epochs_matches_loop():
    for tokens in (1, 2, 7, 100, 1001):
        for seq in (1, 3, 64, 1000):
            for samples in (0, 1, 2, 10, 333):
                assert num_epochs_for(tokens, seq, samples) == loop_num_epochs(tokens, seq, samples)


@pytest.mark.parametrize("seq_length", [1, 2, 5, 17, 64])
def test_sample_idx_matches_loop_reference(seq_length):
    rng = np.random.default_rng(seq_length)
    for trial in range(5):
        sizes = rng.integers(0, 12, size=40).astype(np.int32)  # includes empty documents
        sizes[rng.integers(0, 40)] = 1
        doc_idx = rng.permutation(np.tile(np.arange(40), 3))
        if trial == 0:
            sizes[doc_idx[0]] = 0  # Megatron still starts sample 0 at (0, 0)
        if sizes[doc_idx].sum() <= seq_length:
            continue
        np.testing.assert_array_equal(
            build_sample_idx(sizes, doc_idx, seq_length), loop_sample_idx(sizes, doc_idx, seq_length)
        )


def test_doc_and_shuffle_idx_follow_megatron_rng_order():
    """All epochs but a separate last one are shuffled together, then the shuffle index."""
    sizes = np.full(10, 10, dtype=np.int32)
    documents = np.arange(2, 9)  # 70 tokens/epoch, 9 samples/epoch at seq 7
    seq, seed = 7, 5

    # 3 epochs (needs 20*7+1 = 141 tokens -> 3 epochs); last epoch uses 20 - 19 = 1 sample: separate.
    m = build_index_mappings(documents, sizes, 20, seq, seed)
    rng = np.random.RandomState(seed)
    first = np.tile(documents, 2)
    rng.shuffle(first)
    last = documents.copy()
    rng.shuffle(last)
    np.testing.assert_array_equal(m.doc_idx, np.concatenate([first, last]))
    before_last = (2 * 70 - 1) // seq
    total = (3 * 70 - 1) // seq
    s1 = np.arange(before_last)
    rng.shuffle(s1)
    s2 = np.arange(before_last, total)
    rng.shuffle(s2)
    np.testing.assert_array_equal(m.shuffle_idx, np.concatenate([s1, s2]))

    # 26 samples: 3 epochs, last epoch uses 26 - 19 = 7 >= int(0.8 * 9) = 7 samples: one shuffle.
    m = build_index_mappings(documents, sizes, 26, seq, seed)
    rng = np.random.RandomState(seed)
    all_epochs = np.tile(documents, 3)
    rng.shuffle(all_epochs)
    np.testing.assert_array_equal(m.doc_idx, all_epochs)
    s = np.arange(total)
    rng.shuffle(s)
    np.testing.assert_array_equal(m.shuffle_idx, s)
    for arr in (m.doc_idx, m.sample_idx, m.shuffle_idx):
        assert arr.dtype == np.int64


@pytest.mark.parametrize("seq_length", [1, 4, 16, 100])
@pytest.mark.parametrize("num_samples", [1, 40, 700])
def test_samples_equal_brute_force_concatenation(seq_length, num_samples):
    docs = random_docs(seed=seq_length, num_docs=30, min_len=1, max_len=40)
    docs[7] = docs[7][:0]  # an empty document inside the split
    data = InMemoryIndexedDataset(docs)
    documents = np.arange(3, 27)
    ds = GPTDataset("train", data, documents, num_samples, seq_length, seed=1234)
    tokens = int(data.sizes[documents].sum())
    assert ds.num_epochs == num_epochs_for(tokens, seq_length, num_samples)
    assert len(ds) >= num_samples
    assert len(ds) == (ds.num_epochs * tokens - 1) // seq_length
    # every document appears once per epoch, none from outside the split
    np.testing.assert_array_equal(np.sort(ds.doc_idx), np.sort(np.tile(documents, ds.num_epochs)))
    np.testing.assert_array_equal(np.sort(ds.shuffle_idx), np.arange(len(ds)))
    stream = reference_stream(docs, ds.doc_idx)
    for j in range(len(ds)):
        k = int(ds.shuffle_idx[j])
        sample = ds[j]["text"]
        assert sample.dtype == np.int64 and sample.shape == (seq_length + 1,)
        np.testing.assert_array_equal(sample, stream[k * seq_length : (k + 1) * seq_length + 1])


def test_each_document_appears_once_per_epoch():
    docs = random_docs(seed=3, num_docs=8, min_len=5, max_len=9)
    ds = GPTDataset("train", InMemoryIndexedDataset(docs), np.arange(8), 100, 8, seed=0)
    assert ds.num_epochs > 5
    counts = np.bincount(ds.doc_idx, minlength=8)
    assert (counts == ds.num_epochs).all()


def test_getitem_bounds_and_errors():
    data = InMemoryIndexedDataset(random_docs(seed=0, num_docs=5))
    ds = GPTDataset("train", data, np.arange(5), 3, 4, seed=0)
    np.testing.assert_array_equal(ds[-1]["text"], ds[len(ds) - 1]["text"])
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ValueError, match="no documents"):
        GPTDataset("valid", data, np.arange(0), 3, 4, seed=0)
    with pytest.raises(ValueError, match="seq_length"):
        GPTDataset("train", data, np.arange(5), 3, 0, seed=0)
    with pytest.raises(ValueError, match=r"document ids must lie in \[0, 5\)"):
        GPTDataset("train", data, np.arange(3, 7), 3, 4, seed=0)
    empty = InMemoryIndexedDataset([np.zeros(0), np.zeros(0)])
    with pytest.raises(ValueError, match="hold no tokens"):
        GPTDataset("train", empty, np.arange(2), 3, 4, seed=0)


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def test_cache_filename_changes_with_every_parameter(tmp_path):
    base = dict(
        path_prefix="/data/fr_text_document", name="train", num_samples=100, seq_length=2048, seed=1234,
        fingerprint="abc",
    )
    paths = index_cache_paths(**base)
    assert paths["doc_idx"] == "/data/fr_text_document_train_indexmap_100ns_2048sl_1234s_abc_doc_idx.npy"
    assert set(paths) == {"doc_idx", "sample_idx", "shuffle_idx"}
    variants = dict(
        path_prefix="/data/de_text_document", name="valid", num_samples=101, seq_length=1024, seed=1,
        fingerprint="abd",
    )
    for key, value in variants.items():
        assert index_cache_paths(**{**base, key: value})["doc_idx"] != paths["doc_idx"], key
    # in a cache_dir, prefixes with the same base name still get different files
    a = index_cache_paths(**{**base, "path_prefix": "/x/fr"}, cache_dir=str(tmp_path))
    b = index_cache_paths(**{**base, "path_prefix": "/y/fr"}, cache_dir=str(tmp_path))
    assert a["doc_idx"] != b["doc_idx"] and os.path.dirname(a["doc_idx"]) == str(tmp_path)

    # the documents fingerprint: ranges, sets, and the dataset's shape
    fp = gpt_dataset._documents_fingerprint
    assert fp(np.arange(0, 10), 20, 100) != fp(np.arange(1, 11), 20, 100)
    assert fp(np.arange(0, 10), 20, 100) != fp(np.arange(0, 11), 20, 100)
    assert fp(np.arange(0, 10), 20, 100) != fp(np.arange(0, 10), 21, 100)
    assert fp(np.arange(0, 10), 20, 100) != fp(np.arange(0, 10), 20, 101)
    assert fp(np.array([0, 2, 4]), 20, 100) != fp(np.array([0, 2, 5]), 20, 100)


def test_cached_build_is_identical_and_memory_mapped(tmp_path):
    docs = random_docs(seed=1, num_docs=50)
    data = InMemoryIndexedDataset(docs, path_prefix=str(tmp_path / "lang_text_document"))
    in_memory = GPTDataset("train", InMemoryIndexedDataset(docs), np.arange(45), 200, 16, seed=7)
    first = GPTDataset("train", data, np.arange(45), 200, 16, seed=7)
    files = sorted(p.name for p in tmp_path.glob("*.npy"))
    assert len(files) == 3 and all(f.startswith("lang_text_document_train_indexmap_200ns_16sl_7s_") for f in files)
    mtimes = {f: os.stat(tmp_path / f).st_mtime_ns for f in files}
    second = GPTDataset("train", data, np.arange(45), 200, 16, seed=7)
    assert {f: os.stat(tmp_path / f).st_mtime_ns for f in files} == mtimes  # loaded, not rebuilt
    for kind in ("doc_idx", "sample_idx", "shuffle_idx"):
        assert isinstance(getattr(second, kind), np.memmap)
        np.testing.assert_array_equal(getattr(first, kind), getattr(second, kind))
        np.testing.assert_array_equal(getattr(in_memory, kind), getattr(second, kind))
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".*"))  # no temporaries left
    # a different seed or split gets its own files
    GPTDataset("train", data, np.arange(45), 200, 16, seed=8)
    GPTDataset("valid", data, np.arange(45, 50), 10, 16, seed=7)
    assert len(list(tmp_path.glob("*.npy"))) == 9


def test_cache_dir_and_corrupt_cache_file(tmp_path):
    docs = random_docs(seed=2, num_docs=20)
    cache = tmp_path / "cache"
    ds = GPTDataset("train", InMemoryIndexedDataset(docs), np.arange(20), 30, 8, seed=0, cache_dir=cache)
    assert ds.cache_paths is not None and len(list(cache.glob("train_indexmap_*.npy"))) == 3
    np.save(ds.cache_paths["sample_idx"], np.zeros((4, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="sample_idx.npy: shape .* delete the file"):
        GPTDataset("train", InMemoryIndexedDataset(docs), np.arange(20), 30, 8, seed=0, cache_dir=cache)


def test_pickled_dataset_remaps_cache(tmp_path):
    import pickle

    docs = random_docs(seed=4, num_docs=20)
    ds = GPTDataset("train", InMemoryIndexedDataset(docs), np.arange(20), 30, 8, seed=0, cache_dir=tmp_path)
    clone = pickle.loads(pickle.dumps(ds))
    assert isinstance(clone.shuffle_idx, np.memmap)
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds[i]["text"], clone[i]["text"])


# ---------------------------------------------------------------------------------------------
# Real .bin/.idx files
# ---------------------------------------------------------------------------------------------


def test_real_indexed_dataset_end_to_end(tmp_path):
    from megatron.data.indexed_dataset import MMapIndexedDataset

    docs = random_docs(seed=9, num_docs=60, max_len=80, vocab=60_000)
    prefix = write_indexed_dataset(tmp_path / "en_text_document", docs, dtype=np.uint16)
    data = MMapIndexedDataset(prefix)
    train_range = split_documents(len(data), "0.9,0.1")[0]
    assert train_range == (0, 54)
    ds = GPTDataset("train", data, np.arange(*train_range), 150, 32, seed=42)
    assert len(list(tmp_path.glob("en_text_document_train_indexmap_150ns_32sl_42s_*.npy"))) == 3
    stream = reference_stream(docs, ds.doc_idx)
    for j in range(len(ds)):
        k = int(ds.shuffle_idx[j])
        np.testing.assert_array_equal(ds[j]["text"], stream[k * 32 : (k + 1) * 32 + 1])


# ---------------------------------------------------------------------------------------------
# Distributed: rank 0 builds, the other rank waits and maps the same files; a failure on
# rank 0 reaches every rank instead of leaving them waiting
# ---------------------------------------------------------------------------------------------


def _two_rank_worker(rank: int, world_size: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size)
    try:
        builds = []
        real_build = gpt_dataset.build_index_mappings

        def counting_build(*args, **kwargs):
            builds.append(rank)
            time.sleep(0.5)  # make rank 1 really wait for the files
            return real_build(*args, **kwargs)

        gpt_dataset.build_index_mappings = counting_build
        docs = random_docs(seed=11, num_docs=40)
        data = InMemoryIndexedDataset(docs, path_prefix=os.path.join(tmp, "data", "xx_text_document"))
        os.makedirs(os.path.join(tmp, "data"), exist_ok=True)
        ds = GPTDataset("train", data, np.arange(40), 500, 8, seed=3)
        samples = np.stack([ds[i]["text"] for i in range(0, len(ds), 7)])

        def failing_build(*args, **kwargs):
            raise OSError("disk full")

        gpt_dataset.build_index_mappings = failing_build
        try:
            GPTDataset("valid", data, np.arange(40), 10, 8, seed=3)
            error = ""
        except Exception as e:  # rank 0 re-raises its own error, rank 1 hears about it
            error = f"{type(e).__name__}: {e}"
        np.savez(
            os.path.join(tmp, f"rank{rank}.npz"),
            doc_idx=ds.doc_idx, sample_idx=ds.sample_idx, shuffle_idx=ds.shuffle_idx,
            samples=samples, builds=np.array(builds, dtype=np.int64), error=np.array(error),
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_build_once_and_agree(tmp_path):
    mp.spawn(_two_rank_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = np.load(tmp_path / "rank0.npz"), np.load(tmp_path / "rank1.npz")
    assert r0["builds"].tolist() == [0] and r1["builds"].tolist() == []
    assert str(r0["error"]) == "OSError: disk full"
    assert str(r1["error"]) == "RuntimeError: rank 1: rank 0 failed to build the index cache: OSError: disk full"
    for key in ("doc_idx", "sample_idx", "shuffle_idx", "samples"):
        np.testing.assert_array_equal(r0[key], r1[key])
    sizes = InMemoryIndexedDataset(random_docs(seed=11, num_docs=40)).sizes
    reference = build_index_mappings(np.arange(40), sizes, 500, 8, 3)
    np.testing.assert_array_equal(r0["shuffle_idx"], reference.shuffle_idx)
