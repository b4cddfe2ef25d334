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
or failed run never leaves ``.bin``/``.idx`` files that look finished. Progress is committed
every ``--commit-interval`` seconds (``PREFIX.partial.json`` and ``*.partial`` files): killed,
out of disk space or interrupted, the same command started again continues from the last commit
and ends with output byte-identical to an uninterrupted run's. Exit status: 0 on
success, 1 on failure, 2 on bad arguments, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

try:
    from megatron.data.document_readers import PreprocessError
    from megatron.data.preprocess import Job, corpus_jobs, run
    from megatron.data.preprocess_summary import format_summary, summary_dict, total_summary
    from megatron.utils.atomic import atomic_write_text
    from megatron.utils.terminal import show_progress
except ImportError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from megatron.data.document_readers import PreprocessError
    from megatron.data.preprocess import Job, corpus_jobs, run
    from megatron.data.preprocess_summary import format_summary, summary_dict, total_summary
    from megatron.utils.atomic import atomic_write_text
    from megatron.utils.terminal import show_progress


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
    p.add_argument("--commit-interval", type=float, default=30.0, metavar="SECONDS",
                   help="commit progress this often; killed and run again, the same command continues from the "
                        "last commit (byte-identical output)")
    p.add_argument("--summary-json", type=Path, default=None, help="also write the summary as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar (none either off a terminal)")
    return p.parse_args(argv)


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
            match_special_tokens=args.match_special_tokens, commit_seconds=args.commit_interval,
        )
    except KeyboardInterrupt:
        print("preprocess_data: interrupted; the unfinished dataset has no output yet, only its committed progress "
              "(*.partial files): the same command continues from there", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            out_dir = Path(args.output_prefix).resolve().parent if args.corpus_dir is None else args.output_prefix
            print(f"preprocess_data: error: {os.strerror(err.errno)} writing under {out_dir}: no output was published; "
                  "free space (or raise ulimit -f) and run the same command again, it continues from its last commit",
                  file=sys.stderr)
        else:
            print(f"preprocess_data: error: {err}", file=sys.stderr)
        return 1
    except (PreprocessError, ValueError) as err:
        print(f"preprocess_data: error: {err}", file=sys.stderr)
        return 1
    total = total_summary(summaries, time.perf_counter() - t0)
    if len(summaries) > 1:
        for job, s in zip(jobs, summaries):
            print(f"{Path(job.output_prefix).name}: {s.documents:,} docs, {s.tokens:,} tokens")
    print(format_summary(total))
    for out in total.outputs:
        print(f"wrote {out}.bin / .idx")
    if args.summary_json is not None:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.summary_json, json.dumps(summary_dict(total, summaries, args.workers), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
