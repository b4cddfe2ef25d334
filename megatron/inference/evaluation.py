"""Per-language loss and perplexity of a model on held-out data.

Each language's documents are read in order (a ``.bin/.idx`` pair, or JSON lines tokenized here
with an end-of-document token after every document, as tools/preprocess_data.py --append-eod
writes them), joined into one token stream and cut into windows of ``seq_length + 1`` tokens
that overlap by one token: window ``i`` holds tokens ``[i * seq_length, (i + 1) * seq_length]``,
its inputs are all but the last and its labels all but the first. That is how Megatron's
GPTDataset builds samples (without the shuffling), so every token after the first is predicted
exactly once, with up to ``seq_length - 1`` tokens of context. A final partial window is left
out. The loss is the mean next-token cross entropy over every predicted token, the perplexity
its exponential.

Windows are dealt round-robin to the data-parallel ranks; each rank's micro-batches run through
the model (tensor-parallel inside it) and the sums of losses and token counts are added up over
the data-parallel group, so any layout reports the same numbers.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron.core.parallel_state import ParallelState
from megatron.data.indexed_dataset import MMapIndexedDataset, index_file_path
from megatron.errors import DataError


class EvaluationDataError(DataError):
    """A held-out data source cannot be read; the message names the file and what to do."""


@dataclass(frozen=True)
class DataSource:
    """One language's held-out data: a ``.bin/.idx`` prefix or a JSON lines file."""

    name: str
    path: str
    kind: str  # "indexed" or "jsonl"


def parse_data_source(spec: str) -> DataSource:
    """``NAME=PATH`` or ``PATH`` (the name is then the file name without suffixes) -> DataSource.

    PATH is a ``.bin/.idx`` prefix (``PATH.idx`` exists, or PATH ends in ``.bin``/``.idx``) or a
    JSON lines file (``.jsonl``, ``.json``, optionally ``.gz``)."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = "", spec
    stripped = path[:-4] if path.endswith((".bin", ".idx")) else path
    if Path(index_file_path(stripped)).is_file():
        kind, path = "indexed", stripped
    elif Path(path).is_file() and path.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        kind = "jsonl"
    else:
        raise EvaluationDataError(f"{spec}: {path} is neither a .bin/.idx prefix ({index_file_path(stripped)} does "
                                  "not exist) nor a .jsonl/.json(.gz) file: pass PREFIX (of PREFIX.bin/PREFIX.idx) "
                                  "or a JSON lines file")
    if not name:
        name = Path(path).name.split(".")[0].removesuffix("_text_document")
    return DataSource(name, path, kind)


def read_jsonl_documents(path: str | os.PathLike, key: str = "text") -> Iterator[str]:
    """The ``key`` field of every line of a JSON lines file (gzip'd when it ends in ``.gz``)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvaluationDataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(key), str):
                raise EvaluationDataError(f"{path}:{number}: no string field '{key}': pass --json-key with the field "
                                          "that holds the text")
            yield record[key]


def token_stream(source: DataSource, tokenizer=None, json_key: str = "text") -> Iterator[np.ndarray]:
    """The documents of ``source`` as token arrays, in file order."""
    if source.kind == "indexed":
        dataset = MMapIndexedDataset(source.path)
        for doc in range(dataset.num_documents):
            yield dataset.get_document(doc)
        return
    if tokenizer is None:
        raise EvaluationDataError(f"{source.path} is raw text: a tokenizer is needed (pass --tokenizer, or evaluate a "
                                  "checkpoint whose config names one)")
    for text in read_jsonl_documents(source.path, json_key):
        yield np.asarray([*tokenizer.encode(text), tokenizer.eod_id], dtype=np.int64)


def make_windows(documents: Iterator[np.ndarray], seq_length: int, max_windows: Optional[int] = None) -> np.ndarray:
    """[windows, seq_length + 1] int64: the stream cut as the module docstring says; reads only
    as many documents as ``max_windows`` windows need."""
    needed = None if max_windows is None else max_windows * seq_length + 1
    parts, count = [], 0
    for doc in documents:
        parts.append(np.asarray(doc, dtype=np.int64))
        count += len(doc)
        if needed is not None and count >= needed:
            break
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    windows = max(0, (len(stream) - 1) // seq_length)
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        return np.zeros((0, seq_length + 1), dtype=np.int64)
    starts = np.arange(windows) * seq_length
    return stream[starts[:, None] + np.arange(seq_length + 1)[None, :]]


@dataclass
class LanguageResult:
    """One language's numbers."""

    loss: float
    ppl: float
    tokens: int  # predicted tokens
    windows: int


def perplexity(loss: float) -> float:
    """exp(loss), infinite where it overflows."""
    return math.exp(loss) if loss < 709.0 else float("inf")


@torch.no_grad()
def evaluate_windows(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], windows: np.ndarray,
                     micro_batch_size: int, parallel: ParallelState, device: torch.device,
                     progress: Optional[Callable[[int], None]] = None) -> LanguageResult:
    """Mean loss over every predicted token of ``windows``. ``loss_fn(inputs, labels)`` returns
    the mean loss of one micro-batch (every rank of a TP group gets the same value)."""
    mine = windows[parallel.dp_rank :: parallel.dp_size]
    totals = torch.zeros(2, dtype=torch.float64)  # sum of token losses, tokens
    for start in range(0, len(mine), micro_batch_size):
        batch = torch.from_numpy(mine[start : start + micro_batch_size]).to(device)
        loss = loss_fn(batch[:, :-1], batch[:, 1:])
        tokens = batch[:, 1:].numel()
        totals += torch.tensor([float(loss) * tokens, tokens], dtype=torch.float64)
        if progress is not None:
            progress(len(batch))
    if parallel.dp_enabled:
        dist.all_reduce(totals, group=parallel.dp_group)
    loss_sum, tokens = totals.tolist()
    loss = loss_sum / tokens if tokens else float("nan")
    return LanguageResult(loss, perplexity(loss), int(tokens), len(windows))


def overall(results: dict[str, LanguageResult]) -> LanguageResult:
    """Every language together: the token-weighted mean loss."""
    tokens = sum(r.tokens for r in results.values())
    windows = sum(r.windows for r in results.values())
    loss = sum(r.loss * r.tokens for r in results.values()) / tokens if tokens else float("nan")
    return LanguageResult(loss, perplexity(loss), tokens, windows)


def format_table(results: dict[str, LanguageResult]) -> str:
    """A plain-text table, one line per language and one for all of them."""
    rows = [("language", "loss", "perplexity", "tokens", "windows")]
    for name, r in {**results, "all": overall(results)}.items():
        rows.append((name, f"{r.loss:.4f}", f"{r.ppl:.3f}", f"{r.tokens:,}", f"{r.windows:,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, lines[1])
    return "\n".join(lines)


def results_json(results: dict[str, LanguageResult], sources: Sequence[DataSource], **about) -> dict:
    """The JSON report: ``about`` (checkpoint, layout...), every language and ``all``."""
    paths = {s.name: s.path for s in sources}
    return {**about,
            "languages": {name: {**asdict(r), "source": paths.get(name)} for name, r in results.items()},
            "all": asdict(overall(results))}
