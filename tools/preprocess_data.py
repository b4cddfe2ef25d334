#!/usr/bin/env python3
"""Tokenize documents into Megatron ``.bin``/``.idx`` datasets (one pair per JSON key).

    python tools/preprocess_data.py --input data/en.jsonl.gz --json-keys text \\
        --tokenizer tokenizer.json --output-prefix data/processed/en --append-eod --workers 2

writes ``data/processed/en_text_document.bin`` and ``.idx``. Each input record becomes one
document of one sequence, followed by the end-of-document token with ``--append-eod``.

Inputs: JSON lines (``.jsonl``/``.json``/``.ndjson``, optionally ``.gz``), Parquet files,
and ``datasets`` datasets saved with ``save_to_disk`` (pass the directory). With several
inputs, their documents are concatenated in the order given. ``--corpus-dir DIR`` instead
writes one dataset per language file of a corpus directory such as ``data/corpus``:
``OUTPUT_PREFIX/<lang>_text_document``.

How it runs. The main process reads records in order and cuts them into batches of
``--chunk-size`` documents; ``--workers`` processes each parse a batch and tokenize it with
``encode_batch`` (one thread each: ``N`` workers use ``N`` cores), and return one flat id array
plus the document lengths. The main process appends those arrays to the ``.bin`` as raw bytes
in batch order, so the output is the same whatever the number of workers. At most
``2 x workers + 2`` batches are in flight, so memory stays bounded on inputs of any size.

Bad records are skipped and counted: malformed JSON, invalid UTF-8, a missing key, a
non-string value (the first few are listed with their ``file:line``). With ``--strict`` the
first one fails the run instead. Empty documents (only whitespace) are skipped and counted;
with several ``--json-keys`` a record is kept only if every key is usable, so document ``i``
is the same record in every key's output.

Outputs are written under temporary names and renamed only when complete, so an interrupted
or failed run never leaves ``.bin``/``.idx`` files that look finished. Exit status: 0 on
success, 1 on failure, 2 on bad arguments, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm import tqdm

try:
    from megatron.data.indexed_dataset import IndexedDatasetBuilder, best_dtype, data_file_path, index_file_path
    from megatron.data.tokenizer import HFTokenizer, load_tokenizer
    from megatron.utils.terminal import show_progress
except ImportError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from megatron.data.indexed_dataset import IndexedDatasetBuilder, best_dtype, data_file_path, index_file_path
    from megatron.data.tokenizer import HFTokenizer, load_tokenizer
    from megatron.utils.terminal import show_progress

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
SKIP_REASONS = ("malformed_json", "invalid_utf8", "not_an_object", "missing_key", "non_string", "empty")
MAX_EXAMPLES = 5  # bad records listed per reason
_MAX_BATCH_BYTES = 4 << 20  # a batch also closes at this many input bytes (bounds memory)


class PreprocessError(RuntimeError):
    """A failure that ends the run with a message for the user (exit status 1)."""


# ---------------------------------------------------------------------------------------
# Reading: every reader yields Batch objects in input order
# ---------------------------------------------------------------------------------------
@dataclass
class Batch:
    """Records handed to one worker call.

    ``lines`` is raw JSON-lines bytes (``first`` = line number of its first line);
    ``columns`` maps each key to its values (``first`` = index of its first row).
    ``progress`` is the input position (bytes of the inputs on disk) after this batch.
    """

    source: str
    first: int
    lines: bytes | None = None
    columns: dict[str, list[Any]] | None = None
    progress: int = 0


def input_kind(path: Path) -> str:
    """``jsonl``, ``parquet`` or ``hf_dataset`` for an input path.

    Raises:
        PreprocessError: missing path or unknown format.
    """
    if path.is_dir():
        if any((path / n).is_file() for n in ("state.json", "dataset_dict.json", "dataset_info.json")):
            return "hf_dataset"
        raise PreprocessError(f"{path}: a directory, but not a dataset saved with datasets' save_to_disk")
    if not path.is_file():
        raise PreprocessError(f"input {path} does not exist")
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    raise PreprocessError(
        f"{path}: unknown input format; expected JSON lines ({', '.join(JSONL_SUFFIXES)}), "
        f"Parquet ({', '.join(PARQUET_SUFFIXES)}) or a save_to_disk directory"
    )


def input_size(path: Path) -> int:
    """Bytes of an input on disk (the progress bar's unit)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def read_jsonl(path: Path, chunk_size: int, base: int) -> Iterator[Batch]:
    """Batches of raw lines of a JSON-lines file (gzip'd when the name ends in .gz)."""
    with open(path, "rb") as raw:
        f = gzip.GzipFile(fileobj=raw, mode="rb") if path.name.endswith(".gz") else raw
        lines: list[bytes] = []
        nbytes, first, lineno = 0, 1, 0
        for line in f:
            lineno += 1
            lines.append(line)
            nbytes += len(line)
            if len(lines) >= chunk_size or nbytes >= _MAX_BATCH_BYTES:
                yield Batch(str(path), first, lines=b"".join(lines), progress=base + raw.tell())
                lines, nbytes, first = [], 0, lineno + 1
        if lines:
            yield Batch(str(path), first, lines=b"".join(lines), progress=base + raw.tell())


def _check_columns(path: Path, available: Sequence[str], keys: Sequence[str]) -> None:
    missing = [k for k in keys if k not in available]
    if missing:
        raise PreprocessError(
            f"{path}: no column {', '.join(map(repr, missing))}; it has {list(available)}. "
            "Pass the right one with --json-keys."
        )


def read_parquet(path: Path, keys: Sequence[str], chunk_size: int, base: int) -> Iterator[Batch]:
    """Batches of the ``keys`` columns of a Parquet file."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    _check_columns(path, pf.schema_arrow.names, keys)
    rows, size, done = pf.metadata.num_rows, path.stat().st_size, 0
    for rb in pf.iter_batches(batch_size=chunk_size, columns=list(keys)):
        cols = {k: rb.column(k).to_pylist() for k in keys}
        first, done = done, done + rb.num_rows
        yield Batch(str(path), first, columns=cols, progress=base + (size * done // max(rows, 1)))


def read_hf_dataset(path: Path, keys: Sequence[str], chunk_size: int, base: int, split: str | None) -> Iterator[Batch]:
    """Batches of the ``keys`` columns of a dataset saved with ``save_to_disk``."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        name = split or ("train" if "train" in ds else (splits[0] if len(splits) == 1 else None))
        if name not in ds:
            raise PreprocessError(f"{path}: a DatasetDict with splits {splits}; choose one with --split")
        ds = ds[name]
    _check_columns(path, ds.column_names, keys)
    ds = ds.select_columns(list(keys))
    size, rows, done = input_size(path), len(ds), 0
    for cols in ds.iter(batch_size=chunk_size):
        n = len(cols[keys[0]])
        first, done = done, done + n
        progress = base + size * done // max(rows, 1)
        yield Batch(str(path), first, columns={k: list(cols[k]) for k in keys}, progress=progress)


def read_inputs(
    paths: Sequence[Path], keys: Sequence[str], chunk_size: int, split: str | None = None
) -> Iterator[Batch]:
    """All batches of all inputs, in order; ``progress`` counts bytes across inputs."""
    base = 0
    for path in paths:
        kind = input_kind(path)
        if kind == "jsonl":
            yield from read_jsonl(path, chunk_size, base)
        elif kind == "parquet":
            yield from read_parquet(path, keys, chunk_size, base)
        else:
            yield from read_hf_dataset(path, keys, chunk_size, base, split)
        base += input_size(path)


# ---------------------------------------------------------------------------------------
# Encoding: runs in the workers (or in-process with --workers 1)
# ---------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """What a worker returns for one batch."""

    ids: dict[str, np.ndarray]  # key -> flat token ids of the kept documents
    lengths: dict[str, np.ndarray]  # key -> tokens per kept document (int32)
    docs: int = 0
    text_bytes: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[tuple[str, str, str]] = field(default_factory=list)  # (reason, location, detail)
    blank_lines: int = 0


@dataclass
class _EncoderState:
    tokenizer: HFTokenizer
    keys: tuple[str, ...]
    append_eod: bool
    dtype: np.dtype


_STATE: _EncoderState | None = None


def _init_encoder(
    tokenizer_path: str, keys: Sequence[str], append_eod: bool, dtype: str, match_special_tokens: bool = False,
    tokenizer: HFTokenizer | None = None,
) -> None:
    """Per-process setup: load the tokenizer once and keep it single-threaded."""
    global _STATE
    # N worker processes should use N cores, not N x (tokenizers' thread pool). tokenizers
    # reads this variable at every call, so setting it here takes effect at once.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = tokenizer if tokenizer is not None else load_tokenizer(
        tokenizer_path, split_special_tokens=not match_special_tokens)
    _STATE = _EncoderState(tok, tuple(keys), append_eod, np.dtype(dtype))


def _parse_line(raw: bytes, keys: Sequence[str]) -> tuple[list[str] | None, str, str]:
    """Texts of ``keys`` from one JSON line, or (None, reason, detail)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, "invalid_utf8", f"byte {err.start}: {err.reason}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        return None, "malformed_json", err.msg + f" at column {err.colno}"
    if not isinstance(obj, dict):
        return None, "not_an_object", f"a JSON {type(obj).__name__}, expected an object"
    return _pick_texts(obj, keys)


def _pick_texts(
    obj: dict | None, keys: Sequence[str], values: Sequence[Any] | None = None
) -> tuple[list[str] | None, str, str]:
    """Validate the values of ``keys`` (from a JSON object or a columnar row)."""
    texts = []
    for i, k in enumerate(keys):
        if values is not None:
            v = values[i]
            if v is None:
                return None, "missing_key", f"{k!r} is null"
        else:
            if k not in obj:
                return None, "missing_key", f"no key {k!r} (keys: {list(obj)[:5]})"
            v = obj[k]
        if not isinstance(v, str):
            return None, "non_string", f"{k!r} has type {type(v).__name__}, expected a string"
        texts.append(v)
    return texts, "", ""


def _utf8_len(text: str) -> int | None:
    """UTF-8 size, or None for text that is not encodable (lone surrogates from \\ud800 escapes)."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return None


def encode_batch(batch: Batch) -> Encoded:
    """Parse, validate and tokenize one batch (uses the per-process encoder state)."""
    st = _STATE
    assert st is not None, "encoder not initialised"
    keys = st.keys
    kept: list[list[str]] = []
    out = Encoded(ids={}, lengths={})

    def skip(reason: str, loc: str, detail: str) -> None:
        out.skipped[reason] += 1
        if sum(1 for r, _, _ in out.examples if r == reason) < MAX_EXAMPLES:
            out.examples.append((reason, loc, detail))

    if batch.lines is not None:
        lines = batch.lines.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()  # the file's final newline
        records = ((f"{batch.source}:{batch.first + i}", raw) for i, raw in enumerate(lines))
    else:
        cols = [batch.columns[k] for k in keys]
        records = ((f"{batch.source}:row {batch.first + i}", row) for i, row in enumerate(zip(*cols)))

    for loc, rec in records:
        if isinstance(rec, bytes):
            if not rec.strip():
                out.blank_lines += 1
                continue
            texts, reason, detail = _parse_line(rec, keys)
        else:
            texts, reason, detail = _pick_texts(None, keys, rec)
        if texts is None:
            skip(reason, loc, detail)
            continue
        sizes = [_utf8_len(t) for t in texts]
        if any(s is None for s in sizes):
            skip("invalid_utf8", loc, "lone surrogate (\\ud800-\\udfff escape)")
            continue
        if any(not t or t.isspace() for t in texts):
            skip("empty", loc, "empty or whitespace-only text")
            continue
        kept.append(texts)
        out.text_bytes += sum(sizes)

    for j, k in enumerate(keys):
        flat, lengths = st.tokenizer.encode_batch_flat([t[j] for t in kept], st.dtype, append_eod=st.append_eod)
        out.ids[k], out.lengths[k] = flat, lengths
    out.docs = len(kept)
    return out


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------
@dataclass
class Job:
    """Inputs that go into one output prefix (one dataset per key)."""

    inputs: list[Path]
    output_prefix: str

    def outputs(self, key: str) -> str:
        return f"{self.output_prefix}_{key}_document"


@dataclass
class Summary:
    """Counts for the final report."""

    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0
    input_bytes: int = 0
    blank_lines: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[tuple[str, str, str]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, enc: Encoded) -> None:
        self.documents += enc.docs
        self.tokens += sum(len(v) for v in enc.ids.values())
        self.text_bytes += enc.text_bytes
        self.blank_lines += enc.blank_lines
        self.skipped.update(enc.skipped)
        self.add_examples(enc.examples)

    def add_examples(self, examples: Sequence[tuple[str, str, str]]) -> None:
        """Keep the first MAX_EXAMPLES bad records of each reason."""
        for ex in examples:
            if sum(1 for r, _, _ in self.examples if r == ex[0]) < MAX_EXAMPLES:
                self.examples.append(ex)


class _JobWriter:
    """The builders of one job; finalizes all keys together."""

    def __init__(self, job: Job, keys: Sequence[str], dtype: np.dtype) -> None:
        Path(job.output_prefix).parent.mkdir(parents=True, exist_ok=True)
        self.job = job
        self.builders = {k: IndexedDatasetBuilder(data_file_path(job.outputs(k)), dtype) for k in keys}

    def write(self, enc: Encoded) -> None:
        for k, b in self.builders.items():
            b.add_documents(enc.ids[k], enc.lengths[k])

    def finalize(self) -> list[str]:
        for k, b in self.builders.items():
            b.finalize(index_file_path(self.job.outputs(k)))
        return [self.job.outputs(k) for k in self.builders]

    def abort(self) -> None:
        for b in self.builders.values():
            b.abort()


def _tagged_batches(
    jobs: Sequence[Job], keys: Sequence[str], chunk_size: int, split: str | None
) -> Iterator[tuple[int, Batch]]:
    """(job index, batch) over all jobs; every job yields at least one (maybe empty) batch,
    so even an empty input gets its (empty) dataset."""
    base = 0
    for j, job in enumerate(jobs):
        any_batch = False
        for b in read_inputs(job.inputs, keys, chunk_size, split):
            b.progress += base
            any_batch = True
            yield j, b
        base += sum(input_size(p) for p in job.inputs)
        if not any_batch:
            yield j, Batch(str(job.inputs[0]), 1, lines=b"", progress=base)


def start_pool(workers: int, init_args: tuple, tokenizer: HFTokenizer, start_method: str | None = None):
    """A pool of ``workers`` encoder processes.

    ``fork`` (the default where available) starts in milliseconds and the children inherit
    the loaded tokenizer. It is safe here because the pool is created before this process
    starts any thread of its own (the progress bar comes later), and because
    ``TOKENIZERS_PARALLELISM=false`` is set first: tokenizers then never uses its thread
    pool in the children, even if this process used it before. Elsewhere (macOS, Windows)
    ``spawn`` is used: clean children that load the tokenizer themselves.
    """
    method = start_method or ("fork" if sys.platform.startswith("linux") else "spawn")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    ctx = mp.get_context(method)
    args = (*init_args, tokenizer) if method == "fork" else init_args
    return ctx.Pool(workers, initializer=_init_encoder, initargs=args)


def _results(tagged: Iterator[tuple[int, Batch]], pool, window: int) -> Iterator[tuple[int, int, Encoded]]:
    """Encode batches in input order; yields (job index, input progress, encoded batch).

    Runs in this process when ``pool`` is None, else over a bounded window of the pool.
    ``Pool.imap`` would keep the order too, but its feeder thread reads the whole input
    ahead into memory; the window below reads at most ``window`` batches ahead.
    """
    if pool is None:
        for j, b in tagged:
            yield j, b.progress, encode_batch(b)
        return
    pending: deque = deque()
    for j, b in tagged:
        pending.append((j, b.progress, pool.apply_async(encode_batch, (b,))))
        if len(pending) >= window:
            j0, progress, res = pending.popleft()
            yield j0, progress, res.get()
    while pending:
        j0, progress, res = pending.popleft()
        yield j0, progress, res.get()


def _fail_on_bad(enc: Encoded) -> None:
    """--strict: the first bad record (not an empty one) ends the run."""
    for reason, loc, detail in enc.examples:
        if reason != "empty":
            raise PreprocessError(
                f"{loc}: {reason.replace('_', ' ')} ({detail}); fix or remove the record, "
                "or run without --strict to skip and count bad records"
            )


def run(
    jobs: Sequence[Job],
    tokenizer_path: str,
    keys: Sequence[str],
    *,
    append_eod: bool = False,
    workers: int = 1,
    chunk_size: int = 256,
    strict: bool = False,
    split: str | None = None,
    progress: bool = True,
    start_method: str | None = None,
    match_special_tokens: bool = False,
) -> list[Summary]:
    """Preprocess every job; returns one summary per job.

    ``match_special_tokens``: a special token's text inside a document (a literal ``</s>``)
    becomes that token, as Megatron-DeepSpeed's preprocessing does; by default it is encoded as
    plain text, so raw data cannot inject a document separator.

    Raises:
        PreprocessError: bad input (with --strict), unreadable input, or a missing column;
            outputs of the failing job are removed (jobs finished earlier are kept).
    """
    if workers < 1:
        raise PreprocessError(f"--workers must be >= 1, got {workers}")
    if chunk_size < 1:
        raise PreprocessError(f"--chunk-size must be >= 1, got {chunk_size}")
    if not keys:
        raise PreprocessError("--json-keys needs at least one key")
    for job in jobs:
        for p in job.inputs:
            input_kind(p)  # fail before any work on a missing or unknown input
    tok = load_tokenizer(tokenizer_path, split_special_tokens=not match_special_tokens)
    dtype = best_dtype(tok.vocab_size)
    init_args = (str(tokenizer_path), tuple(keys), append_eod, dtype.str, match_special_tokens)
    summaries = [Summary(input_bytes=sum(input_size(p) for p in job.inputs)) for job in jobs]
    saved_env = os.environ.get("TOKENIZERS_PARALLELISM")
    writer: _JobWriter | None = None
    pool = None
    bar = None
    try:
        if workers == 1:
            _init_encoder(*init_args, tokenizer=tok)
        else:
            pool = start_pool(workers, init_args, tok, start_method)  # before any thread starts
        bar = tqdm(total=sum(s.input_bytes for s in summaries), unit="B", unit_scale=True,
                   desc="preprocess", disable=not progress, file=sys.stderr)
        current, t_job = -1, time.perf_counter()
        tagged = _tagged_batches(jobs, keys, chunk_size, split)
        for j, progress_pos, enc in _results(tagged, pool, window=2 * workers + 2):
            if j != current:
                if writer is not None:
                    summaries[current].outputs = writer.finalize()
                    summaries[current].seconds = time.perf_counter() - t_job
                writer, current, t_job = _JobWriter(jobs[j], keys, dtype), j, time.perf_counter()
                if len(jobs) > 1:
                    bar.set_postfix_str(Path(jobs[j].output_prefix).name)
            if strict:
                _fail_on_bad(enc)
            writer.write(enc)
            summaries[j].add(enc)
            bar.update(progress_pos - bar.n)
        if writer is not None:
            summaries[current].outputs = writer.finalize()
            summaries[current].seconds = time.perf_counter() - t_job
            writer = None
        if pool is not None:
            pool.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        if pool is not None:
            pool.terminate()
        raise
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.join()
        if saved_env is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved_env
    return summaries


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
def corpus_jobs(corpus_dir: Path, output_dir: str) -> list[Job]:
    """One job per language file of a corpus directory: ``OUT/<lang>`` (file name up to the
    first dot, e.g. ``natural/zh-Hans.jsonl.gz`` -> ``zh-Hans``)."""
    if not corpus_dir.is_dir():
        raise PreprocessError(f"--corpus-dir {corpus_dir} is not a directory")
    files = sorted(p for p in corpus_dir.rglob("*") if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz")))
    if not files:
        raise PreprocessError(f"--corpus-dir {corpus_dir} holds no .jsonl or .jsonl.gz files")
    jobs: dict[str, Job] = {}
    for f in files:
        lang = f.name.split(".", 1)[0]
        if lang in jobs:
            raise PreprocessError(f"{corpus_dir}: two files for language {lang!r}: {jobs[lang].inputs[0]} and {f}")
        jobs[lang] = Job([f], os.path.join(output_dir, lang))
    return list(jobs.values())


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the module docstring's layout in --help."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=_HelpFormatter,
        epilog="Outputs: PREFIX_{key}_document.bin/.idx per --json-keys entry "
        "(with --corpus-dir: PREFIX/<lang>_{key}_document).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", type=Path, metavar="PATH",
                     help="JSON-lines (.jsonl[.gz]), Parquet, or save_to_disk directories; concatenated in order")
    src.add_argument("--corpus-dir", type=Path,
                     help="preprocess each <lang>.jsonl[.gz] under this directory separately")
    p.add_argument("--output-prefix", required=True,
                   help="output path prefix (a directory with --corpus-dir)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json (or .json.gz, or a directory holding one)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="fields to tokenize; one dataset per key")
    p.add_argument("--append-eod", action="store_true", help="append the end-of-document token to every document")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (each uses one core)")
    p.add_argument("--chunk-size", type=int, default=256, help="documents per batch sent to a worker")
    p.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping it")
    p.add_argument("--split", default=None, help="split of a saved DatasetDict (None: 'train', or the only split)")
    p.add_argument("--match-special-tokens", action="store_true",
                   help="turn special-token text inside documents (a literal </s>) into that token, as "
                        "Megatron-DeepSpeed does (default: encode it as plain text, so data cannot inject separators)")
    p.add_argument("--summary-json", type=Path, default=None, help="also write the summary as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar (none either off a terminal)")
    return p.parse_args(argv)


def format_summary(s: Summary, label: str = "") -> str:
    """The human-readable summary of one job (or of all jobs)."""
    secs = max(s.seconds, 1e-9)
    skipped = ", ".join(f"{r} {s.skipped[r]}" for r in SKIP_REASONS if s.skipped[r]) or "none"
    lines = [
        f"{label}documents {s.documents:,}  tokens {s.tokens:,}  text {s.text_bytes / 1e6:,.2f} MB  "
        f"in {s.seconds:.2f} s  ({s.text_bytes / 1e6 / secs:.2f} MB/s, {s.documents / secs:,.0f} docs/s)",
        f"{label}skipped: {skipped}" + (f"  (blank lines: {s.blank_lines})" if s.blank_lines else ""),
    ]
    for reason, loc, detail in s.examples:
        lines.append(f"{label}  {reason}: {loc}: {detail}")
    return "\n".join(lines)


def _total(summaries: Sequence[Summary], seconds: float) -> Summary:
    tot = Summary(seconds=seconds)
    for s in summaries:
        tot.documents += s.documents
        tot.tokens += s.tokens
        tot.text_bytes += s.text_bytes
        tot.input_bytes += s.input_bytes
        tot.blank_lines += s.blank_lines
        tot.skipped.update(s.skipped)
        tot.add_examples(s.examples)
        tot.outputs += s.outputs
    return tot


def summary_dict(total: Summary, per_job: Sequence[Summary], args: argparse.Namespace, workers: int) -> dict:
    """The ``--summary-json`` contents."""
    secs = max(total.seconds, 1e-9)
    return {
        "documents": total.documents,
        "tokens": total.tokens,
        "text_bytes": total.text_bytes,
        "input_bytes": total.input_bytes,
        "seconds": round(total.seconds, 4),
        "mb_per_s": round(total.text_bytes / 1e6 / secs, 4),
        "docs_per_s": round(total.documents / secs, 2),
        "skipped": {r: total.skipped[r] for r in SKIP_REASONS},
        "blank_lines": total.blank_lines,
        "examples": [{"reason": r, "location": loc, "detail": d} for r, loc, d in total.examples],
        "outputs": total.outputs,
        "workers": workers,
        "jobs": [
            {"output": s.outputs, "documents": s.documents, "tokens": s.tokens, "text_bytes": s.text_bytes,
             "seconds": round(s.seconds, 4)}
            for s in per_job
        ],
        "python": platform.python_version(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 failure, 130 interrupted)."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        if args.corpus_dir is not None:
            jobs = corpus_jobs(args.corpus_dir, args.output_prefix)
        else:
            jobs = [Job(list(args.input), args.output_prefix)]
        summaries = run(
            jobs, args.tokenizer, args.json_keys, append_eod=args.append_eod, workers=args.workers,
            chunk_size=args.chunk_size, strict=args.strict, split=args.split, progress=show_progress(args.quiet),
            match_special_tokens=args.match_special_tokens,
        )
    except KeyboardInterrupt:
        print("preprocess_data: interrupted; no output of the unfinished dataset was kept", file=sys.stderr)
        return 130
    except (PreprocessError, FileNotFoundError, ValueError, OSError) as err:
        print(f"preprocess_data: error: {err}", file=sys.stderr)
        return 1
    total = _total(summaries, time.perf_counter() - t0)
    if len(summaries) > 1:
        for job, s in zip(jobs, summaries):
            print(f"{Path(job.output_prefix).name}: {s.documents:,} docs, {s.tokens:,} tokens")
    print(format_summary(total))
    for out in total.outputs:
        print(f"wrote {out}.bin / .idx")
    if args.summary_json is not None:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps(summary_dict(total, summaries, args, args.workers), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
