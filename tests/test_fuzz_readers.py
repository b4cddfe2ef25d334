"""Fuzzing the readers of user files: random byte edits and truncations of a ``.idx`` (and its
``.bin``), a YAML config with ``--set`` overrides, a JSON-lines file (plain and gzip'd) and a
checkpoint manifest give the project's own error or a valid result; never another exception and
never a hang.

Hypothesis profiles (tests/conftest.py): ``ci``, the default, is derandomized with few examples,
so the main suite stays deterministic and fast; the slow tier (``make test-slow``) runs the same
properties under ``fuzz``: fresh random examples, many more of them.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron.errors import ProjectError

REPO = Path(__file__).resolve().parents[1]
MANIFEST_DIR = REPO / "tests" / "fixtures" / "legacy_checkpoint" / "checkpoints" / "global_step3"
TOKENIZER = REPO / "tests" / "fixtures" / "bloom-bpe-4k" / "tokenizer.json"
HANG_SECONDS = 20  # far above any example's time; past it the reader is stuck


class Hang(BaseException):
    """Raised in a reader that runs past HANG_SECONDS (a BaseException, so no handler eats it)."""


@contextlib.contextmanager
def no_hang():
    """Fail the example, instead of the whole run, when the code under test does not return."""

    def alarm(signum, frame):
        raise Hang(f"no result after {HANG_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- byte edits ----------------------------------------------------------------------------------

_at = st.floats(0, 1, exclude_max=True)
EDIT = st.one_of(
    st.tuples(st.just("truncate"), _at),
    st.tuples(st.just("set"), _at, st.integers(0, 255)),
    st.tuples(st.just("insert"), _at, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), _at, st.integers(1, 16)),
)
EDITS = st.lists(EDIT, min_size=1, max_size=4)


def apply_edits(data: bytes, edits) -> bytes:
    """``data`` with each edit applied in turn; positions are fractions of the current length."""
    for kind, at, *arg in edits:
        i = int(at * len(data))
        if kind == "truncate":
            data = data[:i]
        elif kind == "set" and data:
            data = data[:i] + bytes([arg[0]]) + data[i + 1:]
        elif kind == "insert":
            data = data[:i] + arg[0] + data[i:]
        elif kind == "delete":
            data = data[:i] + data[i + arg[0]:]
    return data


# -- the readers ---------------------------------------------------------------------------------


def _good_dataset(directory: Path) -> str:
    from megatron.data.indexed_dataset import IndexedDatasetBuilder

    prefix = str(directory / "d")
    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(prefix + ".bin", np.uint16) as builder:
        for _ in range(12):
            builder.add_document(rng.integers(0, 4000, int(rng.integers(1, 30))))
        builder.finalize(prefix + ".idx")
    return prefix


def fuzz_idx(directory: Path, edits, which: str) -> None:
    """Open an edited dataset and read every sequence and document of it."""
    from megatron.data.indexed_dataset import MMapIndexedDataset

    prefix = _good_dataset(directory)
    path = Path(prefix + which)
    path.write_bytes(apply_edits(path.read_bytes(), edits))
    try:
        ds = MMapIndexedDataset(prefix)
    except ProjectError:
        return
    with ds:
        for i in range(len(ds)):
            assert len(ds[i]) == ds.sizes[i]
        for d in range(ds.num_documents):
            ds.get_document(d)


GOOD_CONFIG = yaml.safe_dump({
    "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32, "vocab_size": 256},
    "parallel": {"tensor_model_parallel_size": 1, "zero_stage": 1},
    "training": {"micro_batch_size": 2, "global_batch_size": 8, "train_iters": 10, "bf16": "auto",
                 "skip_train_iteration_range": ["2-3"]},
    "optimizer": {"lr": 1.0e-3, "min_lr": 1.0e-4},
    "data": {"tokenizer": "tok.json", "datasets": [{"name": "en", "prefix": "data/en", "weight": 1.0}],
             "split": "0.9,0.1,0"},
    "checkpoint": {"save": "ckpt", "save_interval": 5},
    "logging": {"run_dir": "run", "sample_prompts": ["hello"]},
})
GOOD_OVERRIDES = ["model.num_layers=4", "training.bf16=false", "data.split=0.8,0.2,0", "checkpoint.keep_last=null",
                  "parallel.tensor_model_parallel_size=2", "data.datasets=[]", "logging.log_level=debug"]

def _field_names() -> list[str]:
    import dataclasses

    from megatron.config import Config

    return [f"{section.name}.{f.name}" for section in dataclasses.fields(Config)
            for f in dataclasses.fields(section.default_factory())]


# Any field set to any of these YAML values: wrong types, out-of-range numbers, broken YAML.
ODD_VALUES = ["", "null", "0", "-1", "1.5", "nan", "-inf", "1e400", "true", "'x'", "[1, 2]", "[]", "{a: 1}", "[",
              "2-1", "[{name: x, prefix: y}]", "[null]", "0x10", "!!binary AAA=", "&a [*a]", "\u00e9"]
ANY_FIELD = st.builds(lambda name, value: f"{name}={value}", st.sampled_from(_field_names()),
                      st.sampled_from(ODD_VALUES))
OVERRIDES = st.lists(st.one_of(st.sampled_from(GOOD_OVERRIDES), st.text(max_size=30), ANY_FIELD,
                               st.tuples(st.sampled_from(GOOD_OVERRIDES), EDITS).map(
                                   lambda t: apply_edits(t[0].encode(), t[1]).decode("utf-8", "replace"))),
                     max_size=3)


def fuzz_config(directory: Path, edits, overrides: list[str]) -> None:
    """Load an edited config with overrides: a ConfigError or a config that validates."""
    from megatron.config import Config, ConfigError, load_config

    path = directory / "config.yaml"
    path.write_bytes(apply_edits(GOOD_CONFIG.encode(), edits))
    try:
        cfg = load_config(path, overrides)
    except ConfigError:
        return
    assert isinstance(cfg, Config)


_encoder_ready = False


def fuzz_jsonl(directory: Path, edits, gzipped: bool) -> None:
    """Read and encode an edited JSON-lines file: a PreprocessError, or batches whose bad records
    are counted."""
    from megatron.data.document_encoder import encode_batch, init_encoder
    from megatron.data.document_readers import read_inputs

    global _encoder_ready
    if not _encoder_ready:
        init_encoder(str(TOKENIZER), ("text",), True, "<u2")
        _encoder_ready = True
    text = b"".join(json.dumps({"text": f"doc {i} caf\u00e9 \u4eba"}).encode() + b"\n" for i in range(20))
    data = gzip.compress(text, mtime=0) if gzipped else text
    path = directory / ("in.jsonl.gz" if gzipped else "in.jsonl")
    path.write_bytes(apply_edits(data, edits))
    try:
        for batch in read_inputs([path], ["text"], chunk_size=4):
            enc = encode_batch(batch)
            assert sum(enc.skipped.values()) >= 0
    except ProjectError:
        return


def fuzz_manifest(directory: Path, edits) -> None:
    """Read, verify and search an edited checkpoint manifest: our error, or problems listed."""
    from megatron.checkpoint.store import CheckpointStore, read_manifest, verify_checkpoint

    step = directory / "global_step3"
    shutil.copytree(MANIFEST_DIR, step)
    manifest = step / "manifest.json"
    manifest.write_bytes(apply_edits(manifest.read_bytes(), edits))
    try:
        assert isinstance(read_manifest(step), dict)
    except ProjectError:
        pass
    assert all(isinstance(p, str) for p in verify_checkpoint(step))
    info, report = CheckpointStore(directory).find_newest_complete()
    assert info is None or info.tag == "global_step3"


# -- the properties: derandomized in the main suite, free in the slow tier ------------------------


def _run(fn, *args) -> None:
    with tempfile.TemporaryDirectory() as name, no_hang():
        fn(Path(name), *args)


def _both_tiers(make_test):
    """The property as a main-suite test (profile ``ci``) and a slow-tier one (profile ``fuzz``)."""
    fast = settings(settings.get_profile("ci"))(make_test())
    free = pytest.mark.slow(settings(settings.get_profile("fuzz"))(make_test()))
    return fast, free


def _idx_property():
    @given(edits=EDITS, which=st.sampled_from([".idx", ".idx", ".bin"]))
    def prop(edits, which):
        _run(fuzz_idx, edits, which)

    return prop


def _config_property():
    @given(edits=st.lists(EDIT, max_size=4), overrides=OVERRIDES)
    def prop(edits, overrides):
        _run(fuzz_config, edits, overrides)

    return prop


def _jsonl_property():
    @given(edits=EDITS, gzipped=st.booleans())
    def prop(edits, gzipped):
        _run(fuzz_jsonl, edits, gzipped)

    return prop


def _manifest_property():
    @given(edits=EDITS)
    def prop(edits):
        _run(fuzz_manifest, edits)

    return prop


test_idx_reader, test_idx_reader_free = _both_tiers(_idx_property)
test_config_loader, test_config_loader_free = _both_tiers(_config_property)
test_jsonl_reader, test_jsonl_reader_free = _both_tiers(_jsonl_property)
test_manifest_reader, test_manifest_reader_free = _both_tiers(_manifest_property)


def test_apply_edits():
    assert apply_edits(b"abcdef", [("truncate", 0.5)]) == b"abc"
    assert apply_edits(b"abcdef", [("set", 0.0, 0x41)]) == b"Abcdef"
    assert apply_edits(b"abcdef", [("insert", 0.5, b"XY"), ("delete", 0.0, 2)]) == b"cXYdef"
