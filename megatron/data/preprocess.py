"""Tokenizing documents into Megatron ``.bin``/``.idx`` datasets (see ``tools/preprocess_data.py``).

The main process reads batches in order (:mod:`megatron.data.document_readers`), a pool of
workers encodes them (:mod:`megatron.data.document_encoder`), and the main process appends the
results to the outputs in batch order, so the output does not depend on the number of workers.
Outputs are written under temporary names and renamed only when complete.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from megatron.data.document_encoder import Encoded, encode_batch, init_encoder
from megatron.data.document_readers import Batch, PreprocessError, input_kind, input_size, read_inputs
from megatron.data.indexed_dataset import IndexedDatasetBuilder, best_dtype, data_file_path, index_file_path
from megatron.data.preprocess_summary import Summary
from megatron.data.tokenizer import HFTokenizer, load_tokenizer


@dataclass
class Job:
    """Inputs that go into one output prefix (one dataset per key)."""

    inputs: list[Path]
    output_prefix: str

    def outputs(self, key: str) -> str:
        """Path prefix of ``key``'s dataset (``.bin``/``.idx`` are added to it)."""
        return f"{self.output_prefix}_{key}_document"


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
    return ctx.Pool(workers, initializer=init_encoder, initargs=args)


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


def _require_documents(job: Job, summary: Summary) -> None:
    """Records were read but every one was skipped: an output without a single document would
    only fail later, at training time, so refuse it. (An empty input still gives an empty dataset.)"""
    if summary.documents == 0 and sum(summary.skipped.values()) > 0:
        why = ", ".join(f"{reason} {n}" for reason, n in sorted(summary.skipped.items()))
        raise PreprocessError(f"{', '.join(map(str, job.inputs))}: no usable document (skipped: {why}); nothing was "
                              "written: check --json-keys and the input's format (--strict stops at the first bad "
                              "record and names it)")


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
            init_encoder(*init_args, tokenizer=tok)
        else:
            pool = start_pool(workers, init_args, tok, start_method)  # before any thread starts
        bar = tqdm(total=sum(s.input_bytes for s in summaries), unit="B", unit_scale=True,
                   desc="preprocess", disable=not progress, file=sys.stderr)
        current, t_job = -1, time.perf_counter()
        tagged = _tagged_batches(jobs, keys, chunk_size, split)
        for j, progress_pos, enc in _results(tagged, pool, window=2 * workers + 2):
            if j != current:
                if writer is not None:
                    _require_documents(jobs[current], summaries[current])
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
            _require_documents(jobs[current], summaries[current])
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
