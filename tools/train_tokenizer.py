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
import json
import sys
from pathlib import Path
from typing import Sequence

try:
    from megatron.data.tokenizer_training import build_report, evaluate, format_table, train
    from megatron.errors import reports_errors
    from megatron.utils.atomic import atomic_write_text
except ImportError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from megatron.data.tokenizer_training import build_report, evaluate, format_table, train
    from megatron.errors import reports_errors
    from megatron.utils.atomic import atomic_write_text


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


@reports_errors("train_tokenizer")  # a corrupt input (PreprocessError), an unwritable --output-dir (OSError)
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
    atomic_write_text(args.output_dir / "tokenizer.json", result.tokenizer.to_str(pretty=False))
    report_text = json.dumps(report, indent=1, ensure_ascii=False) + "\n"
    atomic_write_text(args.output_dir / "tokenizer_report.json", report_text)
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
