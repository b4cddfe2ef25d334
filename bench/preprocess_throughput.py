#!/usr/bin/env python3
"""Preprocessing throughput against the tokenizer's own speed (the ceiling), on one large
file and on a directory of files, with outputs checked byte for byte across worker counts.

    python bench/preprocess_throughput.py                 # corpus x 4, 1 and 2 workers, best of 3
    python bench/preprocess_throughput.py --repeat-corpus 1 --repeats 1   # quick look

Inputs, built in a temporary directory from every document of ``--corpus-dir`` repeated
``--repeat-corpus`` times (large enough that loading the tokenizer and starting the workers,
paid once per run, do not decide the figure, as they do not on a real corpus):

* ``directory``: one ``.jsonl.gz`` per language, as the corpus is laid out (``--corpus-dir``);
* ``one file``: every document in one ``.jsonl`` (``--input``).

Measured:

* ceiling: ``tokenizers.Tokenizer.encode_batch`` and ``encode_batch_fast`` over the corpus's
  documents held in memory, in one process, batches of ``--chunk-size`` (MB/s; the faster counts);
* ``tools/preprocess_data.py ... --append-eod --workers N`` end to end (reading, decompressing,
  parsing JSON, tokenizing, writing ``.bin``/``.idx``), as a subprocess, for each N in ``--workers``.

Efficiency = preprocessing MB/s / (N x ceiling MB/s). Every process runs single-threaded:
``TOKENIZERS_PARALLELISM=false`` and ``RAYON_NUM_THREADS=1`` are set here (before tokenizers
loads) and passed to the subprocesses; otherwise ``encode_batch`` would use every core by itself
and "1 worker" would mean "all cores". Each figure is the best of ``--repeats`` runs (the least
disturbed). The outputs of every run of one input must be identical (SHA-256 of each ``.bin`` and
``.idx``), whatever the worker count. Results: a table on stdout and
``bench/results/preprocess_throughput.json`` with the machine's details.
"""

from __future__ import annotations

import os

# Before tokenizers is imported anywhere: one thread per process (see the docstring).
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import gzip  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Sequence  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_record import describe_machine, write_result  # noqa: E402
from megatron.data.tokenizer import load_tokenizer  # noqa: E402

DEFAULT_TOKENIZER = "tests/fixtures/qwen3-byte-bpe/tokenizer.json.gz"


def corpus_texts(corpus_dir: Path) -> list[str]:
    """Every document of the corpus, in the order preprocess_data.py's --corpus-dir uses."""
    files = sorted(p for p in corpus_dir.rglob("*") if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz")))
    texts = []
    for f in files:
        opener = gzip.open if f.name.endswith(".gz") else open
        with opener(f, "rt", encoding="utf-8") as fh:
            texts += [json.loads(line)["text"] for line in fh if line.strip()]
    return texts


def corpus_files(corpus_dir: Path) -> list[Path]:
    """The corpus's JSON-lines files, in the order ``--corpus-dir`` processes them."""
    return sorted(p for p in corpus_dir.rglob("*") if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz")))


def build_inputs(corpus_dir: Path, root: Path, times: int) -> dict[str, list[str]]:
    """The two inputs (``--corpus-dir`` layout and one large file), each document ``times`` times;
    returns the preprocess_data.py arguments that read each."""
    directory, single = root / "corpus", root / "all.jsonl"
    with open(single, "wb") as whole:
        for f in corpus_files(corpus_dir):
            opener = gzip.open if f.name.endswith(".gz") else open
            with opener(f, "rb") as fh:
                lines = b"".join(line if line.endswith(b"\n") else line + b"\n" for line in fh if line.strip())
            target = directory / f.relative_to(corpus_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            with (gzip.open(target, "wb", compresslevel=6) if f.name.endswith(".gz") else open(target, "wb")) as out:
                out.write(lines * times)
            whole.write(lines)
    single.write_bytes(single.read_bytes() * times)
    return {"directory": ["--corpus-dir", str(directory)], "one file": ["--input", str(single)]}


def output_digests(out_dir: Path) -> dict[str, str]:
    """SHA-256 of every output file, by name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out_dir.rglob("*"))
            if p.suffix in (".bin", ".idx")}


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Shortest wall time of ``repeats`` calls (the least disturbed run)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure_ceiling(tokenizer_path: str, texts: list[str], chunk_size: int, repeats: int) -> dict[str, float]:
    """Seconds for tokenizers' encode_batch / encode_batch_fast over all texts, one process."""
    tok = load_tokenizer(tokenizer_path).backend  # same settings (special tokens as text)
    batches = [texts[i : i + chunk_size] for i in range(0, len(texts), chunk_size)]

    def run(method: str) -> None:
        call = getattr(tok, method)
        for b in batches:
            call(b, add_special_tokens=False)

    run("encode_batch")  # warm-up (page cache, allocator)
    return {m: best_time(lambda m=m: run(m), repeats) for m in ("encode_batch", "encode_batch_fast")}


def preprocess_cmd(source: list[str], tokenizer: str, out: Path, workers: int, chunk_size: int,
                   summary: Path) -> list[str]:
    """The preprocess_data.py command line that is measured."""
    return [
        sys.executable, "tools/preprocess_data.py", *source, "--tokenizer", tokenizer,
        "--output-prefix", str(out), "--append-eod", "--workers", str(workers), "--chunk-size", str(chunk_size),
        "--quiet", "--summary-json", str(summary),
    ]


def measure_preprocess(source: list[str], tokenizer: str, workers: int, chunk_size: int, repeats: int) -> dict:
    """Best-of-``repeats`` run of the preprocessing CLI with ``workers`` workers, and the digests
    of its outputs (the same in every run, or this raises)."""
    best: dict | None = None
    digests: dict[str, str] | None = None
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
            summary = Path(tmp) / "summary.json"
            cmd = preprocess_cmd(source, tokenizer, Path(tmp) / "out" / "bench", workers, chunk_size, summary)
            t = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t
            s = json.loads(summary.read_text())
            run_digests = output_digests(Path(tmp) / "out")
        if digests is not None and run_digests != digests:
            raise SystemExit(f"{shlex.join(cmd)}: outputs differ between two runs")
        digests = run_digests
        run = {"seconds": s["seconds"], "wall_seconds": round(wall, 4), "documents": s["documents"],
               "tokens": s["tokens"], "text_bytes": s["text_bytes"]}
        if best is None or run["wall_seconds"] < best["wall_seconds"]:
            best = run
    assert best is not None and digests is not None
    display = preprocess_cmd(["SOURCE"], tokenizer, Path("OUT"), workers, chunk_size, Path("OUT/summary.json"))
    best["command"] = shlex.join(["python", *display[1:]])
    best["digests"] = digests
    return best


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the module docstring's layout in --help."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--corpus-dir", type=Path, default=Path("data/corpus"),
                   help="corpus directory (relative to the repo root)")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer.json[.gz] (the 151,669-token fixture)")
    p.add_argument("--repeat-corpus", type=int, default=4, help="times each document appears in the inputs")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure")
    p.add_argument("--chunk-size", type=int, default=256, help="documents per batch (ceiling and preprocessing)")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best counts")
    p.add_argument("--output", type=Path, default=Path("bench/results/preprocess_throughput.json"), help="results JSON")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON."""
    args = parse_args(argv)
    os.chdir(ROOT)
    texts = corpus_texts(args.corpus_dir)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    print(f"corpus: {len(texts):,} documents, {nbytes / 1e6:.2f} MB, x{args.repeat_corpus} in each input; "
          f"tokenizer {args.tokenizer}", flush=True)
    ceil = measure_ceiling(args.tokenizer, texts, args.chunk_size, args.repeats)
    ceiling_mbs = {m: nbytes / 1e6 / s for m, s in ceil.items()}
    best_ceiling = max(ceiling_mbs.values())
    rows = [(f"ceiling: {m} (1 process)", 1, s, nbytes / 1e6 / s, None) for m, s in ceil.items()]
    total_docs, total_bytes = len(texts) * args.repeat_corpus, nbytes * args.repeat_corpus
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-inputs-") as tmp:
        sources = build_inputs(args.corpus_dir, Path(tmp), args.repeat_corpus)
        for kind, source in sources.items():
            runs[kind] = {}
            for w in args.workers:
                r = measure_preprocess(source, args.tokenizer, w, args.chunk_size, args.repeats)
                if r["text_bytes"] != total_bytes or r["documents"] != total_docs:
                    raise SystemExit(f"{kind}: preprocessing saw {r['documents']} docs / {r['text_bytes']} B, "
                                     f"expected {total_docs} / {total_bytes}")
                mbs = total_bytes / 1e6 / r["wall_seconds"]
                r.update(mb_per_s=round(mbs, 4), efficiency=round(mbs / (w * best_ceiling), 4))
                runs[kind][str(w)] = r
                rows.append((f"{kind}: preprocess_data.py --workers {w}", w, r["wall_seconds"], mbs, r["efficiency"]))
                print(f"  {rows[-1][0]}: {r['wall_seconds']:.1f} s, {r['efficiency']:.0%}", flush=True)
            digests = {json.dumps(r.pop("digests"), sort_keys=True) for r in runs[kind].values()}
            if len(digests) != 1:
                raise SystemExit(f"{kind}: the outputs differ between worker counts {args.workers}")
            runs[kind]["identical_outputs_across_worker_counts"] = True

    print(f"\n{'what':<48}{'procs':>6}{'seconds':>9}{'MB/s':>8}{'eff.':>7}")
    for name, w, s, mbs, eff in rows:
        print(f"{name:<48}{w:>6}{s:>9.2f}{mbs:>8.2f}{'' if eff is None else f'{eff:.0%}':>7}")
    print("eff. = MB/s / (workers x best ceiling MB/s); preprocessing is the whole command's wall time "
          "(start-up, loading the tokenizer, starting workers, writing the files); outputs identical "
          "byte for byte across worker counts")

    write_result(args.output, {
        "benchmark": "preprocess_throughput",
        "command": shlex.join(
            ["python", "bench/preprocess_throughput.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "environment": {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"},
        "machine": describe_machine(),
        "corpus": {"dir": str(args.corpus_dir), "documents": len(texts), "text_bytes": nbytes,
                   "repeated": args.repeat_corpus},
        "tokenizer": args.tokenizer,
        "chunk_size": args.chunk_size,
        "repeats": args.repeats,
        "ceiling": {m: {"seconds": round(s, 4), "mb_per_s": round(ceiling_mbs[m], 4),
                        "docs_per_s": round(len(texts) / s, 2)} for m, s in ceil.items()},
        "preprocess": runs,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
