"""Validating and tokenizing one batch of documents, in a worker process (or in-process).

Each worker loads the tokenizer once (:func:`init_encoder`, the pool's initializer) and then
turns :class:`~megatron.data.document_readers.Batch` objects into flat token arrays with
:func:`encode_batch`. Bad records are skipped and counted by reason, with the first few
locations kept for the report.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from megatron.data.document_readers import Batch
from megatron.data.tokenizer import HFTokenizer, load_tokenizer

SKIP_REASONS = ("malformed_json", "invalid_utf8", "not_an_object", "missing_key", "non_string", "empty")
MAX_EXAMPLES = 5  # bad records listed per reason


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


# Per process, set by init_encoder (the pool's initializer): each worker loads the tokenizer
# once, instead of receiving it pickled with every batch.
_STATE: _EncoderState | None = None


def init_encoder(
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
