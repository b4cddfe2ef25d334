"""BlendedDataset, the greedy blending rule, alpha sampling and the train/valid/test builder."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from data_helpers import random_docs, write_indexed_dataset
from megatron.data import blended_dataset
from megatron.data.blend_builder import build_blended_datasets
from megatron.data.blend_weights import alpha_sampling_weights
from megatron.data.blended_dataset import BlendedDataset, build_blending_indices

# ---------------------------------------------------------------------------------------------
# The greedy rule
# ---------------------------------------------------------------------------------------------


def reference_greedy(weights, size):
    """Megatron's rule in plain Python: the dataset lagging its weight most, first on ties."""
    w = [x / sum(weights) for x in weights]
    counts = [0] * len(w)
    index, sample = [], []
    for t in range(size):
        target = float(max(t, 1))
        errors = [wi * target - ci for wi, ci in zip(w, counts)]
        best = errors.index(max(errors))
        index.append(best)
        sample.append(counts[best])
        counts[best] += 1
    return np.array(index), np.array(sample)


@pytest.mark.parametrize("num_datasets", [1, 2, 3, 7, 40])
def test_greedy_matches_reference(num_datasets):
    rng = np.random.default_rng(num_datasets)
    weights = rng.random(num_datasets) + 0.01
    ref_index, ref_sample = reference_greedy(list(weights), 3000)
    variants = [None, False] + ([True] if blended_dataset._native_kernel() is not None else [])
    for native in variants:
        index, sample = build_blending_indices(weights, 3000, native=native)
        np.testing.assert_array_equal(index, ref_index, err_msg=f"native={native}")
        np.testing.assert_array_equal(sample, ref_sample, err_msg=f"native={native}")
        assert sample.dtype == np.int64


def test_equal_weights_round_robin_and_ties_go_to_lowest_index():
    index, sample = build_blending_indices([1, 1, 1], 9)
    assert index.tolist() == [0, 1, 2] * 3
    assert sample.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("num_datasets", [5, 300])
def test_blend_proportions_within_one_percent(num_datasets):
    rng = np.random.default_rng(0)
    weights = rng.uniform(0.5, 1.5, size=num_datasets)
    weights /= weights.sum()
    size = 100_000
    index, sample = build_blending_indices(weights, size)
    assert index.dtype == np.int16
    assert index.max() == num_datasets - 1  # > 255 datasets are representable
    counts = np.bincount(index, minlength=num_datasets)
    np.testing.assert_allclose(counts / size, weights, rtol=0.01)
    # the greedy keeps every prefix within a couple of samples of the target
    for prefix in (1_000, 33_333):
        prefix_counts = np.bincount(index[:prefix], minlength=num_datasets)
        assert np.abs(prefix_counts - weights * prefix).max() < 2.5
    # per-dataset sample numbers run 0, 1, 2, ... in order
    for d in (0, num_datasets - 1):
        np.testing.assert_array_equal(sample[index == d], np.arange(counts[d]))


def test_index_dtype_widens_past_int16():
    assert blended_dataset._index_dtype(255) == np.int16
    assert blended_dataset._index_dtype(32_767) == np.int16
    assert blended_dataset._index_dtype(32_768) == np.int32


def test_blending_indices_validation():
    for bad in ([], [1.0, 0.0], [1.0, -1.0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="weight"):
            build_blending_indices(bad, 10)
    with pytest.raises(ValueError, match="size"):
        build_blending_indices([1.0], -1)


# ---------------------------------------------------------------------------------------------
# BlendedDataset
# ---------------------------------------------------------------------------------------------


class Tagged:
    """A dataset whose item ``i`` is ``(tag, i)``."""

    def __init__(self, tag: int, n: int, name: str = "") -> None:
        self.tag, self.n, self.name = tag, n, name

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        assert 0 <= i < self.n
        return (self.tag, i)


def test_blended_dataset_routes_samples_and_caches(tmp_path):
    weights = [0.5, 0.3, 0.2]
    parts = [Tagged(t, 600) for t in range(3)]
    blend = BlendedDataset(parts, weights, 1000)
    ref_index, ref_sample = reference_greedy(weights, 1000)
    assert len(blend) == 1000
    assert [blend[i] for i in range(1000)] == list(zip(ref_index.tolist(), ref_sample.tolist()))
    assert blend.samples_per_dataset.tolist() == [500, 300, 200]
    with pytest.raises(IndexError):
        blend[1000]

    cached = BlendedDataset(parts, weights, 1000, cache_dir=tmp_path, name="train")
    again = BlendedDataset(parts, weights, 1000, cache_dir=tmp_path, name="train")
    assert len(list(tmp_path.glob("train_blend_3ds_1000ns_*.npy"))) == 2
    assert isinstance(again.dataset_index, np.memmap)
    np.testing.assert_array_equal(cached.dataset_index, blend.dataset_index)
    np.testing.assert_array_equal(again.dataset_sample_index, blend.dataset_sample_index)
    clone = pickle.loads(pickle.dumps(again))
    assert isinstance(clone.dataset_index, np.memmap) and clone[999] == blend[999]


def test_blended_dataset_errors():
    with pytest.raises(ValueError, match="at least one dataset"):
        BlendedDataset([], [], 10)
    with pytest.raises(ValueError, match="2 datasets but 1 weights"):
        BlendedDataset([Tagged(0, 5), Tagged(1, 5)], [1.0], 10)
    with pytest.raises(ValueError, match=r"takes 50 samples from dataset 1 \(fr\) but it has only 10"):
        BlendedDataset([Tagged(0, 100, "en"), Tagged(1, 10, "fr")], [0.5, 0.5], 100)


# ---------------------------------------------------------------------------------------------
# Alpha sampling
# ---------------------------------------------------------------------------------------------


def test_alpha_sampling_hand_worked():
    counts = [100, 400, 400]  # p = 1/9, 4/9, 4/9
    # alpha = 0.5: sqrt(p) = 1/3, 2/3, 2/3, sum 5/3 -> 0.2, 0.4, 0.4
    np.testing.assert_allclose(alpha_sampling_weights(counts, 0.5), [0.2, 0.4, 0.4], rtol=1e-12)
    # alpha = 2: p^2 = 1/81, 16/81, 16/81, sum 33/81 -> 1/33, 16/33, 16/33
    np.testing.assert_allclose(alpha_sampling_weights(counts, 2), [1 / 33, 16 / 33, 16 / 33], rtol=1e-12)
    np.testing.assert_allclose(alpha_sampling_weights(counts, 1.0), [1 / 9, 4 / 9, 4 / 9], rtol=1e-12)
    np.testing.assert_allclose(alpha_sampling_weights(counts, 0.0), [1 / 3] * 3, rtol=1e-12)
    # BLOOM-like: alpha < 1 up-samples the small language, keeps the order
    q = alpha_sampling_weights([10, 1000, 100_000], 0.3)
    assert q[0] > 10 / 101_010 and q[0] < q[1] < q[2] and abs(q.sum() - 1) < 1e-12


@pytest.mark.parametrize(
    "counts, alpha, match",
    [
        ([], 0.3, "non-empty"),
        ([10, 0], 0.3, r"token_counts\[1\] = 0"),
        ([10, -5], 0.3, r"token_counts\[1\]"),
        ([10, 5], -0.1, "alpha"),
        ([10, 5], float("nan"), "alpha"),
        ([10, 5], None, "alpha"),
    ],
)
def test_alpha_sampling_validation(counts, alpha, match):
    with pytest.raises(ValueError, match=match):
        alpha_sampling_weights(counts, alpha)


# ---------------------------------------------------------------------------------------------
# build_blended_datasets on real .bin/.idx files
# ---------------------------------------------------------------------------------------------

VOCAB_RANGES = {"en": (0, 1000), "fr": (1000, 2000), "sw": (2000, 3000)}


@pytest.fixture
def languages(tmp_path):
    """Three languages with disjoint token ranges; ``sw`` is too small for a valid split."""
    num_docs = {"en": 200, "fr": 80, "sw": 5}
    prefixes = {}
    for seed, (name, n) in enumerate(num_docs.items()):
        lo, hi = VOCAB_RANGES[name]
        docs = [d % (hi - lo) + lo for d in random_docs(seed=seed, num_docs=n, min_len=20, max_len=60)]
        prefixes[name] = write_indexed_dataset(tmp_path / f"{name}_text_document", docs)
    return prefixes


def language_of(sample: np.ndarray) -> str:
    (name,) = [n for n, (lo, hi) in VOCAB_RANGES.items() if lo <= sample.min() and sample.max() < hi]
    return name


def test_build_blended_datasets_with_weights(languages, tmp_path):
    specs = [("en", languages["en"], 6.0), ("fr", languages["fr"], 3.0), ("sw", languages["sw"], 1.0)]
    with pytest.warns(UserWarning, match=r"'sw'.*valid split has 0 documents.*left out of valid"):
        built = build_blended_datasets(specs, seq_length=32, seed=1234, split="0.95,0.05,0",
                                       train_samples=2000, valid_samples=64, test_samples=0)
    assert built.weights == pytest.approx({"en": 0.6, "fr": 0.3, "sw": 0.1})
    assert built.test is None and built.test_per_language == {}
    assert len(built.train) == 2000 and len(built.valid) == 64
    counts = np.bincount(built.train.dataset_index, minlength=3) / 2000
    np.testing.assert_allclose(counts, [0.6, 0.3, 0.1], atol=1e-3)
    # each language's train dataset got ceil(2000 * w * 1.005) samples (or whole epochs more)
    for part, w in zip(built.train.datasets, (0.6, 0.3, 0.1)):
        assert part.num_samples == int(np.ceil(2000 * w * 1.005)) and len(part) >= part.num_samples
    # samples come from the language the blend index says
    names = ["en", "fr", "sw"]
    for i in range(0, 2000, 37):
        sample = built.train[i]["text"]
        assert sample.shape == (33,) and language_of(sample) == names[built.train.dataset_index[i]]
    # validation: sw skipped, every kept language has >= valid_samples samples on its own
    assert set(built.valid_per_language) == {"en", "fr"}
    for name, ds in built.valid_per_language.items():
        assert len(ds) >= 64 and language_of(ds[0]["text"]) == name
        assert ds.documents[0] == {"en": 190, "fr": 76}[name]  # the last 5% of the documents
    np.testing.assert_allclose(built.valid.weights, [2 / 3, 1 / 3])
    # index caches sit next to the data
    assert list(tmp_path.glob("en_text_document_train_indexmap_1206ns_32sl_1234s_*_doc_idx.npy"))


def test_build_blended_datasets_with_alpha_and_test_split(languages, tmp_path):
    from megatron.data.gpt_dataset import split_documents
    from megatron.data.indexed_dataset import MMapIndexedDataset

    specs = [{"name": n, "prefix": languages[n], "weight": None} for n in ("en", "fr")]
    built = build_blended_datasets(specs, 16, 7, "0.8,0.1,0.1", 500, 20, 20, alpha=0.3, cache_dir=tmp_path / "cache")
    tokens = []
    for n in ("en", "fr"):
        ds = MMapIndexedDataset(languages[n])
        start, end = split_documents(len(ds), "0.8,0.1,0.1")[0]
        tokens.append(int(ds.sizes[start:end].sum()))
    expected = alpha_sampling_weights(tokens, 0.3)
    assert list(built.weights.values()) == pytest.approx(expected.tolist())
    assert set(built.test_per_language) == {"en", "fr"} and len(built.test) == 20
    assert len(list((tmp_path / "cache").glob("*.npy"))) > 0
    assert not list(tmp_path.glob("*_indexmap_*.npy"))  # nothing written next to the data


def test_build_blended_datasets_errors(languages, tmp_path):
    common = dict(seq_length=16, seed=0, split="0.9,0.1,0", train_samples=100, valid_samples=0, test_samples=0)
    en, fr = languages["en"], languages["fr"]
    with pytest.raises(ValueError, match="both set"):
        build_blended_datasets([("en", en, 1.0)], alpha=0.3, **common)
    with pytest.raises(ValueError, match="no weights and data.alpha is not set"):
        build_blended_datasets([("en", en, None)], **common)
    with pytest.raises(ValueError, match=r"weights are missing for \['fr'\]"):
        build_blended_datasets([("en", en, 1.0), ("fr", fr, None)], **common)
    with pytest.raises(ValueError, match=r"duplicate names \['en'\]"):
        build_blended_datasets([("en", en, 1.0), ("en", fr, 1.0)], **common)
    with pytest.raises(ValueError, match=r"\['fr'\]\.weight = 0"):
        build_blended_datasets([("en", en, 1.0), ("fr", fr, 0)], **common)
    with pytest.raises(FileNotFoundError, match=r"data.datasets\['de'\]: cannot open .*de_text_document"):
        build_blended_datasets([("en", en, 1.0), ("de", str(tmp_path / "de_text_document"), 1.0)], **common)
    with pytest.raises(ValueError, match=r"data.datasets\['sw'\].*train split has 0 documents"):
        build_blended_datasets([("en", en, 1.0), ("sw", languages["sw"], 1.0)], **{**common, "split": "0.05,0.95,0"})
    with pytest.raises(ValueError, match="empty"):
        build_blended_datasets([], **common)


def test_a_kernel_that_does_not_compile_is_reported(monkeypatch, tmp_path, caplog):
    """A broken compiler means the numpy fallback (same indices, ~40x slower): said, not hidden."""
    compiler = tmp_path / "broken-cc"
    compiler.write_text("#!/bin/sh\necho 'cc: internal error' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    blended_dataset._native_kernel.cache_clear()
    try:
        with caplog.at_level("WARNING", logger=blended_dataset.__name__):
            assert blended_dataset._native_kernel() is None
    finally:
        blended_dataset._native_kernel.cache_clear()
    assert "could not build the C blend kernel" in caplog.text and "internal error" in caplog.text
    assert "using the numpy fallback" in caplog.text
