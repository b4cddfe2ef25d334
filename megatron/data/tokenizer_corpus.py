"""What a tokenizer is trained on: per-language input files, their texts, and byte budgets.

A file's language is its name up to the first dot (``natural/zh-Hans.jsonl.gz`` ->
``zh-Hans``). Language ``i`` with byte share ``p_i`` gets ``q_i = p_i**alpha / sum_j
p_j**alpha`` of the byte budget; :func:`plan_takes` meets a language's budget exactly, with
whole documents in a seeded random order, repeated when the budget exceeds the data.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from megatron.data.document_readers import checked_lines

# Searched for in directories; plain .json is left out there (metadata such as a corpus's
# languages.json), but accepted when a file is named explicitly.
_DIR_SUFFIXES = (".jsonl.gz", ".jsonl", ".ndjson", ".ndjson.gz")


def language_of(path: Path) -> str:
    """Language code of a data file: its name up to the first dot (``zh-Hans.jsonl.gz``)."""
    return path.name.split(".", 1)[0]


def discover_inputs(specs: Sequence[str]) -> dict[str, list[Path]]:
    """Language -> files, from files, directories (searched recursively) or ``LANG=PATH``.

    Raises:
        FileNotFoundError: a path does not exist, or a directory holds no JSON-lines files.
    """
    found: dict[str, list[Path]] = {}
    for spec in specs:
        lang = None
        if "=" in spec and not Path(spec).exists():
            lang, spec = spec.split("=", 1)
        path = Path(spec)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(_DIR_SUFFIXES))
            if not files:
                raise FileNotFoundError(f"{path}: no {', '.join(_DIR_SUFFIXES)} files in this directory")
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"input {path} does not exist")
        for f in files:
            found.setdefault(lang or language_of(f), []).append(f)
    return found


@dataclass
class ReadStats:
    """Lines of one language that could not be used."""

    bad_lines: int = 0
    examples: list[str] = field(default_factory=list)


def iter_texts(path: Path, json_key: str, stats: ReadStats | None = None) -> Iterator[str]:
    """Non-empty ``json_key`` strings of a JSON-lines file (gzip'd or not), in file order.

    Unusable lines (bad JSON or UTF-8, missing or non-string key) are skipped and counted in
    ``stats``; preprocessing (``tools/preprocess_data.py``) is where they are reported in
    detail.
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(checked_lines(f, path), 1):
            if not raw.strip():
                continue
            try:
                text = json.loads(raw)[json_key]
                if not isinstance(text, str):
                    raise TypeError(type(text).__name__)
            except (ValueError, KeyError, TypeError) as err:  # UnicodeDecodeError is a ValueError
                if stats is not None:
                    stats.bad_lines += 1
                    if len(stats.examples) < 3:
                        stats.examples.append(f"{path}:{lineno}: {type(err).__name__}")
                continue
            if text:
                yield text


def sampling_probabilities(bytes_per_language: dict[str, int], alpha: float) -> dict[str, float]:
    """``q_i = p_i**alpha / sum_j p_j**alpha`` with ``p_i`` the byte share of language i."""
    if alpha <= 0:
        raise ValueError(f"--alpha must be > 0, got {alpha}")
    total = sum(bytes_per_language.values())
    if total <= 0:
        raise ValueError("the inputs hold no text")
    weights = {lang: (b / total) ** alpha if b > 0 else 0.0 for lang, b in bytes_per_language.items()}
    norm = sum(weights.values())
    return {lang: w / norm for lang, w in weights.items()}


def byte_budgets(
    bytes_per_language: dict[str, int], alpha: float, max_bytes: int | None = None, max_repeat: float | None = None
) -> dict[str, int]:
    """Bytes of each language to feed the trainer: ``round(q_i * max_bytes)``, capped at
    ``max_repeat`` times the language's data when given. ``max_bytes`` defaults to the
    total input bytes."""
    total = sum(bytes_per_language.values()) if max_bytes is None else int(max_bytes)
    probs = sampling_probabilities(bytes_per_language, alpha)
    budgets = {lang: int(round(q * total)) for lang, q in probs.items()}
    if max_repeat is not None:
        budgets = {lang: min(b, int(max_repeat * bytes_per_language[lang])) for lang, b in budgets.items()}
    return budgets


def plan_takes(doc_bytes: np.ndarray, budget: int, rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
    """How often to feed each document to meet ``budget`` bytes exactly.

    Every document is fed ``budget // total`` times; the remainder is filled with whole
    documents in a random order, the last of which is cut. Returns ``(takes, cut_doc,
    cut_bytes)``: document ``cut_doc`` is fed once more, truncated to ``cut_bytes`` bytes
    (``cut_doc == -1`` when nothing is cut).
    """
    total = int(doc_bytes.sum())
    takes = np.zeros(len(doc_bytes), dtype=np.int64)
    if budget <= 0 or total == 0:
        return takes, -1, 0
    takes += budget // total
    rest = budget % total
    if rest == 0:
        return takes, -1, 0
    order = rng.permutation(len(doc_bytes))
    cum = np.cumsum(doc_bytes[order])
    whole = int(np.searchsorted(cum, rest, side="right"))  # docs that fit entirely
    takes[order[:whole]] += 1
    done = int(cum[whole - 1]) if whole else 0
    if done == rest:
        return takes, -1, 0
    return takes, int(order[whole]), rest - done


def truncate_utf8(text: str, nbytes: int) -> str:
    """The longest prefix of ``text`` with at most ``nbytes`` UTF-8 bytes."""
    return text.encode("utf-8")[:nbytes].decode("utf-8", errors="ignore")


@dataclass
class LanguageData:
    """One language's files and per-document byte sizes (from a first pass)."""

    code: str
    files: list[Path]
    doc_bytes: np.ndarray
    stats: ReadStats

    @property
    def total_bytes(self) -> int:
        """UTF-8 bytes of all the language's documents."""
        return int(self.doc_bytes.sum())


def scan_languages(inputs: dict[str, list[Path]], json_key: str) -> dict[str, LanguageData]:
    """First pass: the UTF-8 size of every document of every language."""
    out = {}
    for lang, files in sorted(inputs.items()):
        stats = ReadStats()
        sizes = [len(t.encode("utf-8")) for f in files for t in iter_texts(f, json_key, stats)]
        out[lang] = LanguageData(lang, files, np.asarray(sizes, dtype=np.int64), stats)
    return out
