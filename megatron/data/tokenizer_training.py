"""Training a BLOOM-style byte-level BPE tokenizer (see ``tools/train_tokenizer.py --help``).

:func:`build_bpe_tokenizer` is BLOOM's design: no normaliser, a regex ``Split`` on
:data:`SPLIT_PATTERN` then ``ByteLevel``, a BPE over all 256 bytes, and the special tokens
``<unk> <s> </s> <pad>`` as ids 0-3. :func:`train` feeds it each language's byte budget
(:mod:`megatron.data.tokenizer_corpus`); :func:`evaluate` and :func:`build_report` measure bytes
per token and the round trip per language.
"""

from __future__ import annotations

import sys
import time
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from megatron.data.tokenizer_corpus import (
    LanguageData,
    byte_budgets,
    discover_inputs,
    iter_texts,
    plan_takes,
    sampling_probabilities,
    scan_languages,
    truncate_utf8,
)

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>")
# Separators: ASCII, CJK full-width, Indic danda, Arabic-script marks; not the apostrophe, operators
# or ``_``, so ``don't`` and ``snake_case`` stay whole (tools/train_tokenizer.py --help gives the reasons).
_SEPARATORS = r".,;:!?…\"()\[\]{}<>" + "。，、；：！？「」『』（）【】《》" + "।॥" + "،؛؟۔"
SPLIT_PATTERN = r" ?[^\s" + _SEPARATORS + r"]+"
_BATCH_TEXTS = 512  # texts per hand-over to the Rust trainer (amortises the FFI call)


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
            yield truncate_utf8(text, cut_bytes)


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
