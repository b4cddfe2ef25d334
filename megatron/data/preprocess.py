"""Tokenizing documents into Megatron ``.bin``/``.idx`` datasets (see ``tools/preprocess_data.py``).

The main process reads batches in order (:mod:`megatron.data.document_readers`), a pool of
workers encodes them (:mod:`megatron.data.document_encoder`), and the main process appends the
results to the outputs in batch order, so the output does not depend on the number of workers.
Outputs are written under temporary names and renamed only when complete.

Resuming. Each job writes its ids to ``<output>.bin.partial`` and, every ``commit_seconds``,
commits: the ``.bin.partial`` files are fsynced, the sizes of the documents written so far are
appended to ``<output>.sizes.partial``, and ``<prefix>.partial.json`` records how many input
batches, documents and bytes that covers and the counts of the summary (atomically, last). A
run killed at any point and started again with the same command finds that record, cuts the
files back to the committed bytes, skips the batches already encoded (reading them, without
tokenizing) and continues; the result is byte-identical to an uninterrupted run's. The record
also holds the inputs' sizes and times and every option that changes the output; when any of
them differ, the partial files are dropped and the job starts over (said on the console).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from megatron.data.document_encoder import Encoded, encode_batch, init_encoder
from megatron.data.document_readers import Batch, PreprocessError, input_kind, input_size, read_inputs
from megatron.data.indexed_dataset import IndexedDatasetBuilder, best_dtype, data_file_path, index_file_path
from megatron.data.preprocess_summary import Summary
from megatron.data.tokenizer import HFTokenizer, load_tokenizer
from megatron.utils.atomic import atomic_write_text

STATE_VERSION = 1


@dataclass
class Job:
    """Inputs that go into one output prefix (one dataset per key)."""

    inputs: list[Path]
    output_prefix: str

    def outputs(self, key: str) -> str:
        """Path prefix of ``key``'s dataset (``.bin``/``.idx`` are added to it)."""
        return f"{self.output_prefix}_{key}_document"


class _JobWriter:
    """The builders of one job, resumable (see the module docstring); finalizes all keys together."""

    def __init__(self, job: Job, keys: Sequence[str], dtype: np.dtype, fingerprint: dict) -> None:
        Path(job.output_prefix).parent.mkdir(parents=True, exist_ok=True)
        self.job, self.keys, self.fingerprint = job, list(keys), fingerprint
        self.state_path = _state_path(job)
        self.batches = 0  # input batches whose documents are in the builders
        self.committed = 0
        state = load_state(job, fingerprint)
        if state is None:
            for k in keys:  # leftovers of a run with other inputs or options
                for path in (self._bin_partial(k), self._sizes_partial(k)):
                    path.unlink(missing_ok=True)
        self.builders = {k: IndexedDatasetBuilder(data_file_path(job.outputs(k)), dtype, self._bin_partial(k))
                         for k in keys}
        self.summary: dict | None = None
        if state is not None:
            for k, b in self.builders.items():
                entry = state["keys"][k]
                sizes = np.fromfile(self._sizes_partial(k), dtype=np.int64, count=entry["documents"])
                b.restore(entry["bin_bytes"], sizes)
                os.truncate(self._sizes_partial(k), entry["documents"] * 8)
            self.batches = self.committed = state["batches"]
            self.summary = state["summary"]
            print(f"preprocess: resuming {job.output_prefix} after {state['documents']} committed documents "
                  f"({state['batches']} batches)", file=sys.stderr, flush=True)

    def _bin_partial(self, key: str) -> Path:
        return Path(f"{self.job.outputs(key)}.bin.partial")

    def _sizes_partial(self, key: str) -> Path:
        return Path(f"{self.job.outputs(key)}.sizes.partial")

    def write(self, enc: Encoded) -> None:
        """Append one encoded batch (the next one in input order)."""
        for k, b in self.builders.items():
            b.add_documents(enc.ids[k], enc.lengths[k])
        self.batches += 1

    def commit(self, summary: Summary) -> None:
        """Make the batches written so far survive a crash (see the module docstring)."""
        if self.batches == self.committed:
            return
        keys = {}
        for k, b in self.builders.items():
            nbytes, sizes = b.commit_point()
            path = self._sizes_partial(k)
            done = path.stat().st_size // 8 if path.exists() else 0
            with open(path, "ab") as f:
                f.truncate(done * 8)
                f.write(np.ascontiguousarray(sizes[done:], dtype=np.int64).tobytes())
                f.flush()
                os.fsync(f.fileno())
            keys[k] = {"bin_bytes": nbytes, "documents": len(sizes)}
        state = {"version": STATE_VERSION, "fingerprint": self.fingerprint, "batches": self.batches,
                 "documents": next(iter(keys.values()))["documents"], "keys": keys,
                 "summary": _summary_counts(summary)}
        atomic_write_text(self.state_path, json.dumps(state) + "\n")
        self.committed = self.batches

    def finalize(self) -> list[str]:
        """Write the indexes and publish the outputs; the partial files and the record go."""
        for k, b in self.builders.items():
            b.finalize(index_file_path(self.job.outputs(k)))
        self.state_path.unlink(missing_ok=True)
        for k in self.keys:
            self._sizes_partial(k).unlink(missing_ok=True)
        return [self.job.outputs(k) for k in self.builders]

    def abort(self) -> None:
        """Bad input: drop everything of this job (a rerun would fail the same way)."""
        for b in self.builders.values():
            b.abort()
        self.state_path.unlink(missing_ok=True)
        for k in self.keys:
            self._sizes_partial(k).unlink(missing_ok=True)

    def close(self) -> None:
        """Interrupted (a signal, a full disk): keep the committed part for the next run."""
        for b in self.builders.values():
            if b._file is not None and not b._file.closed:
                b._file.close()


def _state_path(job: Job) -> Path:
    return Path(f"{job.output_prefix}.partial.json")


def load_state(job: Job, fingerprint: dict) -> dict | None:
    """The committed progress of an interrupted run of ``job``, when it had the same inputs and
    options (``fingerprint``); None (and the stale record removed) otherwise."""
    path = _state_path(job)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        state = None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or state.get("fingerprint") != fingerprint:
        print(f"preprocess: {path} is from a run with other inputs or options: starting {job.output_prefix} over",
              file=sys.stderr, flush=True)
        path.unlink(missing_ok=True)
        return None
    return state


def _summary_counts(s: Summary) -> dict:
    counts = asdict(s)
    counts["skipped"] = dict(s.skipped)
    counts["examples"] = [list(e) for e in s.examples]
    return {k: counts[k] for k in ("documents", "tokens", "text_bytes", "blank_lines", "skipped", "examples")}


def _restore_counts(s: Summary, counts: dict) -> None:
    s.documents, s.tokens, s.text_bytes = counts["documents"], counts["tokens"], counts["text_bytes"]
    s.blank_lines, s.skipped = counts["blank_lines"], Counter(counts["skipped"])
    s.examples = [tuple(e) for e in counts["examples"]]


def _fingerprint(job: Job, tokenizer_path: str, keys: Sequence[str], options: dict) -> dict:
    """What decides a job's output: inputs (path, size, mtime), tokenizer file and options."""
    def identity(path) -> list:
        st = os.stat(path)
        return [os.fspath(path), st.st_size, st.st_mtime_ns]

    tokenizer = Path(tokenizer_path)
    return {"inputs": [identity(p) for p in job.inputs],
            "tokenizer": identity(tokenizer) if tokenizer.is_file() else os.fspath(tokenizer),
            "keys": list(keys), **options}


def _tagged_batches(
    jobs: Sequence[Job], keys: Sequence[str], chunk_size: int, split: str | None, skip: dict[int, int]
) -> Iterator[tuple[int, Batch]]:
    """(job index, batch) over all jobs; every job yields at least one (maybe empty) batch,
    so even an empty input gets its (empty) dataset. The first ``skip[j]`` batches of job ``j``
    (already committed by an interrupted run) are read but not yielded."""
    base = 0
    for j, job in enumerate(jobs):
        any_batch = False
        for n, b in enumerate(read_inputs(job.inputs, keys, chunk_size, split)):
            if n < skip.get(j, 0):
                continue
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


def _finish_job(writer: _JobWriter, job: Job, summary: Summary, started: float) -> None:
    """Publish a finished job's outputs (refused when every record was skipped) and time it."""
    _require_documents(job, summary)
    summary.outputs = writer.finalize()
    summary.seconds = time.perf_counter() - started


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
    commit_seconds: float = 30.0,
) -> list[Summary]:
    """Preprocess every job; returns one summary per job.

    Progress is committed every ``commit_seconds`` so that the same call after a crash
    continues from there (see the module docstring).

    ``match_special_tokens``: a special token's text inside a document (a literal ``</s>``)
    becomes that token, as Megatron-DeepSpeed's preprocessing does; by default it is encoded as
    plain text, so raw data cannot inject a document separator.

    Raises:
        PreprocessError: bad input (with --strict), unreadable input, or a missing column;
            outputs of the failing job are removed (jobs finished earlier are kept).
        OSError: a full disk, say: the failing job's committed progress is kept for the next run.
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
    options = {"append_eod": append_eod, "chunk_size": chunk_size, "split": split, "dtype": dtype.str,
               "match_special_tokens": match_special_tokens}
    fingerprints = [_fingerprint(job, tokenizer_path, keys, options) for job in jobs]
    skip = {}
    for j, job in enumerate(jobs):
        state = load_state(job, fingerprints[j])
        if state is not None:
            skip[j] = state["batches"]
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
        last_commit = time.monotonic()
        tagged = _tagged_batches(jobs, keys, chunk_size, split, skip)
        for j, progress_pos, enc in _results(tagged, pool, window=2 * workers + 2):
            if j != current:
                if writer is not None:
                    _finish_job(writer, jobs[current], summaries[current], t_job)
                writer, current, t_job = _JobWriter(jobs[j], keys, dtype, fingerprints[j]), j, time.perf_counter()
                if writer.summary is not None:
                    _restore_counts(summaries[j], writer.summary)
                if len(jobs) > 1:
                    bar.set_postfix_str(Path(jobs[j].output_prefix).name)
            if strict:
                _fail_on_bad(enc)
            writer.write(enc)
            summaries[j].add(enc)
            bar.update(progress_pos - bar.n)
            if time.monotonic() - last_commit >= commit_seconds:
                writer.commit(summaries[j])
                last_commit = time.monotonic()
        if writer is not None:
            _finish_job(writer, jobs[current], summaries[current], t_job)
            writer = None
        if pool is not None:
            pool.close()
    except PreprocessError:
        if writer is not None:
            writer.abort()
        if pool is not None:
            pool.terminate()
        raise
    except BaseException:
        if writer is not None:
            writer.close()
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
