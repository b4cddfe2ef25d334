#!/usr/bin/env python3
"""Train a BLOOM-style byte-level BPE tokenizer on multilingual JSON-lines data.

    python tools/train_tokenizer.py --input data/corpus --vocab-size 32000 \\
        --alpha 0.3 --output-dir runs/tokenizer

The tokenizer is built like BLOOM's (which has 250,680 tokens: ``--vocab-size 250680``):

* no normaliser: text is tokenised exactly as written, so ``decode(encode(x)) == x``;
* pre-tokeniser: a regex ``Split`` (below), then ``ByteLevel(add_prefix_space=False,
  use_regex=False)``, which only maps bytes to printable characters;
* a byte-level BPE model whose initial alphabet is all 256 bytes (no unknown tokens ever),
  a ``ByteLevel`` decoder, and no post-processor (nothing is added around a text);
* special tokens ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2 (the end-of-document token),
  ``<pad>`` = 3.

Pre-tokenisation (:data:`SPLIT_PATTERN`). BLOOM split text with
``Split(Regex(" ?[^(\\s|[.,!?…。，、।۔،])]+"), behavior="isolated")``: a word is a run of
characters that are neither whitespace nor one of a few sentence marks, plus at most one
leading space; everything between words (whitespace runs, punctuation runs) is kept as a piece
of its own. We keep that design, which works for every script without language rules (no
reliance on Latin-style word boundaries; Chinese runs stay whole and BPE learns their
merges), and widen the separator set to the sentence and bracket marks of BLOOM's scripts:

* ASCII ``. , ; : ! ? " ( ) [ ] { } < >`` and ``…``;
* CJK full-width ``。，、；：！？「」『』（）【】《》``;
* Devanagari/Bengali ``। ॥``, Arabic/Urdu ``، ؛ ؟ ۔``.

The apostrophe is not a separator (``don't``, ``l'homme``, ``aujourd'hui`` stay whole), nor
are operators and ``_`` (so ``snake_case`` or ``x+=1`` stay whole). Whitespace runs such as a
newline plus indentation form one piece, so BPE can learn indentation tokens for code.

Language mix. Inputs are ``.jsonl``/``.jsonl.gz`` files or corpus directories; each file's
language is its name up to the first dot (``natural/zh-Hans.jsonl.gz`` -> ``zh-Hans``), or
give it as ``LANG=PATH``. With ``p_i`` the share of bytes of language ``i`` in the input,
language ``i`` gets ``q_i = p_i**alpha / sum_j p_j**alpha`` of the ``--max-bytes`` budget
(default: all input bytes). ``alpha = 1`` keeps the input mix; smaller values up-sample
small languages (XLM-R/BLOOM-style, 0.3 is usual). A language's budget is met exactly:
documents are taken whole in a seeded random order, repeated when the budget exceeds the
data, and the last one is cut at a UTF-8 character boundary.

Outputs (written atomically: a temporary name, then ``os.replace``):
``tokenizer.json`` and ``tokenizer_report.json`` (per-language bytes fed, bytes per token,
round-trip check), and the same table printed at the end.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>")
# Separators: ASCII, CJK full-width, Indic danda, Arabic-script marks (see module docstring).
_SEPARATORS = r".,;:!?…\"()\[\]{}<>" + "。，、；：！？「」『』（）【】《》" + "।॥" + "،؛؟۔"
SPLIT_PATTERN = r" ?[^\s" + _SEPARATORS + r"]+"
# Searched for in directories; plain .json is left out there (metadata such as a corpus's
# languages.json), but accepted when a file is named explicitly.
_DIR_SUFFIXES = (".jsonl.gz", ".jsonl", ".ndjson", ".ndjson.gz")
_BATCH_TEXTS = 512  # texts per hand-over to the Rust trainer (amortises the FFI call)


# ---------------------------------------------------------------------------------------
# The tokenizer itself
# ---------------------------------------------------------------------------------------
def build_bpe_tokenizer() -> Tokenizer:
    """An untrained BLOOM-style byte-level BPE (pre-tokeniser, decoder; no normaliser)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def make_trainer(vocab_size: int, min_frequency: int = 2, max_token_length: int | None = None) -> trainers.BpeTrainer:
    """A BPE trainer with the four special tokens first (ids 0-3) and all 256 bytes."""
    floor = len(SPECIAL_TOKENS) + 256
    if vocab_size <= floor:
        raise ValueError(
            f"--vocab-size {vocab_size} is too small: the 4 special tokens and 256 bytes need {floor + 1}+"
        )
    return trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=max_token_length,
        show_progress=False,  # its progress bars fight tqdm's; ours covers the input phase
    )


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------
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
        for lineno, raw in enumerate(f, 1):
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


# ---------------------------------------------------------------------------------------
# Alpha sampling
# ---------------------------------------------------------------------------------------
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


def _truncate_utf8(text: str, nbytes: int) -> str:
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
        return int(self.doc_bytes.sum())


def scan_languages(inputs: dict[str, list[Path]], json_key: str) -> dict[str, LanguageData]:
    """First pass: the UTF-8 size of every document of every language."""
    out = {}
    for lang, files in sorted(inputs.items()):
        stats = ReadStats()
        sizes = [len(t.encode("utf-8")) for f in files for t in iter_texts(f, json_key, stats)]
        out[lang] = LanguageData(lang, files, np.asarray(sizes, dtype=np.int64), stats)
    return out


def feed_language(
    data: LanguageData, json_key: str, budget: int, seed: int
) -> Iterator[str]:
    """Second pass: yield this language's documents per :func:`plan_takes`, in file order.

    The generator is seeded by (seed, language), so a language's sample does not depend on
    which other languages are present.
    """
    rng = np.random.default_rng([seed, zlib.crc32(data.code.encode("utf-8"))])
    takes, cut_doc, cut_bytes = plan_takes(data.doc_bytes, budget, rng)
    texts = (t for f in data.files for t in iter_texts(f, json_key))
    for i, text in enumerate(texts):
        for _ in range(int(takes[i])):
            yield text
        if i == cut_doc:
            yield _truncate_utf8(text, cut_bytes)


def _batched(texts: Iterable[str], progress: tqdm, counter: dict[str, int], lang: str) -> Iterator[list[str]]:
    """Group texts into lists for the trainer, counting fed bytes per language."""
    batch: list[str] = []
    for t in texts:
        n = len(t.encode("utf-8"))
        counter[lang] = counter.get(lang, 0) + n
        progress.update(n)
        batch.append(t)
        if len(batch) >= _BATCH_TEXTS:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """A trained tokenizer with what was fed to it."""

    tokenizer: Tokenizer
    budgets: dict[str, int]
    fed_bytes: dict[str, int]
    probabilities: dict[str, float]
    languages: dict[str, LanguageData]
    seconds: float


def train(
    inputs: Sequence[str],
    vocab_size: int,
    *,
    json_key: str = "text",
    alpha: float = 1.0,
    max_bytes: int | None = None,
    max_repeat: float | None = None,
    seed: int = 1234,
    min_frequency: int = 2,
    max_token_length: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a BLOOM-style byte-level BPE on ``inputs`` (files, directories, ``LANG=PATH``)."""
    t0 = time.perf_counter()
    data = scan_languages(discover_inputs(inputs), json_key)
    sizes = {lang: d.total_bytes for lang, d in data.items()}
    probs = sampling_probabilities(sizes, alpha)
    budgets = byte_budgets(sizes, alpha, max_bytes, max_repeat)
    tokenizer = build_bpe_tokenizer()
    trainer = make_trainer(vocab_size, min_frequency, max_token_length)
    fed: dict[str, int] = {}
    bar = tqdm(total=sum(budgets.values()), unit="B", unit_scale=True, desc="feeding BPE trainer", disable=not progress)

    def stream() -> Iterator[list[str]]:
        for lang, d in data.items():
            bar.set_postfix_str(lang)
            yield from _batched(feed_language(d, json_key, budgets[lang], seed), bar, fed, lang)
        bar.close()
        if progress:
            print("computing merges ...", file=sys.stderr, flush=True)

    tokenizer.train_from_iterator(stream(), trainer=trainer)
    return TrainResult(tokenizer, budgets, fed, probs, data, time.perf_counter() - t0)


def evaluate(
    tokenizer: Tokenizer,
    languages: dict[str, LanguageData],
    json_key: str = "text",
    max_bytes_per_language: int = 2_000_000,
) -> dict[str, dict[str, float]]:
    """Bytes per token and round-trip failures per language, on (up to
    ``max_bytes_per_language`` of) each language's text in file order."""
    out = {}
    for lang, d in languages.items():
        texts, nbytes = [], 0
        for t in (t for f in d.files for t in iter_texts(f, json_key)):
            if nbytes >= max_bytes_per_language:
                break
            texts.append(t)
            nbytes += len(t.encode("utf-8"))
        encs = tokenizer.encode_batch(texts, add_special_tokens=False)
        ids = [e.ids for e in encs]
        ntok = sum(len(i) for i in ids)
        decoded = tokenizer.decode_batch(ids, skip_special_tokens=False)
        bad = sum(a != b for a, b in zip(decoded, texts))
        out[lang] = {
            "eval_docs": len(texts),
            "eval_bytes": nbytes,
            "tokens": ntok,
            "bytes_per_token": round(nbytes / ntok, 4) if ntok else 0.0,
            "roundtrip_failures": bad,
        }
    return out


def build_report(result: TrainResult, evaluation: dict, args: dict) -> dict:
    """The ``tokenizer_report.json`` contents."""
    langs = {}
    for lang, d in result.languages.items():
        langs[lang] = {
            "files": [str(f) for f in d.files],
            "docs": int(len(d.doc_bytes)),
            "input_bytes": d.total_bytes,
            "bad_lines": d.stats.bad_lines,
            "sampling_probability": result.probabilities[lang],
            "budget_bytes": result.budgets[lang],
            "fed_bytes": result.fed_bytes.get(lang, 0),
            **evaluation.get(lang, {}),
        }
    tot_bytes = sum(v.get("eval_bytes", 0) for v in evaluation.values())
    tot_tok = sum(v.get("tokens", 0) for v in evaluation.values())
    return {
        "vocab_size": result.tokenizer.get_vocab_size(),
        "special_tokens": {t: result.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS},
        "split_pattern": SPLIT_PATTERN,
        "settings": args,
        "train_seconds": round(result.seconds, 2),
        "fed_bytes_total": sum(result.fed_bytes.values()),
        "bytes_per_token_overall": round(tot_bytes / tot_tok, 4) if tot_tok else 0.0,
        "languages": langs,
    }


def format_table(report: dict) -> str:
    """Per-language table: input and fed bytes, sampling probability, bytes per token."""
    rows = [f"{'lang':<12}{'input B':>11}{'q_i':>9}{'fed B':>11}{'bytes/tok':>11}{'rt fail':>9}"]
    for lang, v in sorted(report["languages"].items(), key=lambda kv: -kv[1]["input_bytes"]):
        rows.append(
            f"{lang:<12}{v['input_bytes']:>11,}{v['sampling_probability']:>9.4f}{v['fed_bytes']:>11,}"
            f"{v.get('bytes_per_token', 0):>11.3f}{v.get('roundtrip_failures', 0):>9}"
        )
    rows.append(
        f"{'all':<12}{sum(v['input_bytes'] for v in report['languages'].values()):>11,}{1:>9.4f}"
        f"{report['fed_bytes_total']:>11,}{report['bytes_per_token_overall']:>11.3f}"
    )
    return "\n".join(rows)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace`` (never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the module docstring's layout in --help."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=_HelpFormatter,
        epilog="Example: python tools/train_tokenizer.py --input data/corpus --vocab-size 32000 "
        "--alpha 0.3 --output-dir runs/tokenizer",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="JSON-lines files (.jsonl, .jsonl.gz), corpus directories (searched recursively), "
                        "or LANG=PATH; a file's language is its name up to the first dot")
    p.add_argument("--output-dir", required=True, type=Path, help="where tokenizer.json and tokenizer_report.json go")
    p.add_argument("--vocab-size", type=int, default=32000,
                   help="final vocabulary size incl. 4 special tokens (BLOOM: 250680)")
    p.add_argument("--json-key", default="text", help="JSON field holding the text")
    p.add_argument("--alpha", type=float, default=1.0,
                   help="language sampling exponent: q_i ~ p_i**alpha (1 = input mix, 0.3 = up-sample small languages)")
    p.add_argument("--max-bytes", type=int, default=None,
                   help="total bytes fed to the trainer (None: all input bytes)")
    p.add_argument("--max-repeat", type=float, default=None,
                   help="cap each language at this many times its data (None: no cap; 1 = never repeat text)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the document sampling")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge")
    p.add_argument("--max-token-length", type=int, default=None, help="longest token, in characters (None: no limit)")
    p.add_argument("--eval-bytes", type=int, default=2_000_000,
                   help="bytes per language used for the bytes-per-token report")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Train, evaluate and write the tokenizer; returns the process exit code."""
    args = parse_args(argv)
    try:
        result = train(
            args.input, args.vocab_size, json_key=args.json_key, alpha=args.alpha, max_bytes=args.max_bytes,
            max_repeat=args.max_repeat, seed=args.seed, min_frequency=args.min_frequency,
            max_token_length=args.max_token_length, progress=not args.quiet and sys.stderr.isatty(),
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"train_tokenizer: error: {err}", file=sys.stderr)
        return 2
    evaluation = evaluate(result.tokenizer, result.languages, args.json_key, args.eval_bytes)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["command"] = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    report = build_report(result, evaluation, settings)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(args.output_dir / "tokenizer.json", result.tokenizer.to_str(pretty=False))
    write_atomic(args.output_dir / "tokenizer_report.json", json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    if not args.quiet:
        print(format_table(report))
    for lang, d in result.languages.items():
        if d.stats.bad_lines:
            print(f"warning: {lang}: skipped {d.stats.bad_lines} unusable lines, e.g. {d.stats.examples[0]}",
                  file=sys.stderr)
    print(
        f"wrote {args.output_dir / 'tokenizer.json'} (vocab {report['vocab_size']:,}, "
        f"{report['fed_bytes_total']:,} bytes fed, {result.seconds:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
