#!/usr/bin/env python3
"""Preprocessing throughput against the tokenizer's own speed (the ceiling).

    python bench/preprocess_throughput.py            # whole demo corpus, 1 and 2 workers

Measures, on the same text (every document of ``data/corpus``):

* ceiling: ``tokenizers.Tokenizer.encode_batch`` (and ``encode_batch_fast``) over the
  documents held in memory, in one process, batches of ``--chunk-size``;
* ``tools/preprocess_data.py --corpus-dir ... --append-eod --workers N`` end to end (reading
  gzip'd JSON lines, parsing, tokenizing, writing 58 ``.bin``/``.idx`` pairs), as a
  subprocess, for each N in ``--workers``.

Efficiency = preprocessing MB/s / (N x ceiling MB/s), with the faster of the two ceiling
calls. Every measurement runs single-threaded per process: ``TOKENIZERS_PARALLELISM=false``
and ``RAYON_NUM_THREADS=1`` are set here (before tokenizers loads) and passed to the
subprocesses; otherwise ``encode_batch`` would use every core by itself and "1 worker" would
mean "all cores". Each figure is the best of ``--repeats`` runs. Results go to a table on
stdout and to ``bench/results/preprocess_throughput.json`` with the machine's details.
"""

from __future__ import annotations

import os

# Before tokenizers is imported anywhere: one thread per process (see the docstring).
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import tokenizers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
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


def preprocess_cmd(
    corpus_dir: Path, tokenizer: str, out: Path, workers: int, chunk_size: int, summary: Path
) -> list[str]:
    """The preprocess_data.py command line that is measured."""
    return [
        sys.executable, "tools/preprocess_data.py", "--corpus-dir", str(corpus_dir), "--tokenizer", tokenizer,
        "--output-prefix", str(out), "--append-eod", "--workers", str(workers), "--chunk-size", str(chunk_size),
        "--quiet", "--summary-json", str(summary),
    ]


def measure_preprocess(corpus_dir: Path, tokenizer: str, workers: int, chunk_size: int, repeats: int) -> dict:
    """Best-of-``repeats`` run of the preprocessing CLI with ``workers`` workers."""
    best: dict | None = None
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
            summary = Path(tmp) / "summary.json"
            cmd = preprocess_cmd(corpus_dir, tokenizer, Path(tmp) / "out", workers, chunk_size, summary)
            t = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t
            s = json.loads(summary.read_text())
        run = {"seconds": s["seconds"], "wall_seconds": round(wall, 4), "documents": s["documents"],
               "tokens": s["tokens"], "text_bytes": s["text_bytes"]}
        if best is None or run["seconds"] < best["seconds"]:
            best = run
    assert best is not None
    display = [Path(c).name if c == sys.executable else c for c in preprocess_cmd(
        corpus_dir, tokenizer, Path("OUT"), workers, chunk_size, Path("OUT/summary.json"))]
    best["command"] = shlex.join(["python", *display[1:]])
    return best


def machine_info() -> dict:
    """CPU, core count and library versions."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or "unknown"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "nproc": usable,
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
    }


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the module docstring's layout in --help."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--corpus-dir", type=Path, default=Path("data/corpus"),
                   help="corpus directory (relative to the repo root)")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer.json[.gz] (the 151,669-token fixture)")
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
    print(f"corpus: {len(texts):,} documents, {nbytes / 1e6:.2f} MB; tokenizer {args.tokenizer}", flush=True)
    ceil = measure_ceiling(args.tokenizer, texts, args.chunk_size, args.repeats)
    ceiling_mbs = {m: nbytes / 1e6 / s for m, s in ceil.items()}
    best_ceiling = max(ceiling_mbs.values())
    rows = [(f"ceiling: {m} (1 process)", 1, s, nbytes / 1e6 / s, len(texts) / s, None) for m, s in ceil.items()]
    runs = {}
    for w in args.workers:
        r = measure_preprocess(args.corpus_dir, args.tokenizer, w, args.chunk_size, args.repeats)
        if r["text_bytes"] != nbytes or r["documents"] != len(texts):
            raise SystemExit(f"preprocessing saw {r['documents']} docs / {r['text_bytes']} B, "
                             f"expected {len(texts)} / {nbytes}")
        mbs = nbytes / 1e6 / r["seconds"]
        r.update(mb_per_s=round(mbs, 4), docs_per_s=round(len(texts) / r["seconds"], 2),
                 efficiency=round(mbs / (w * best_ceiling), 4))
        runs[str(w)] = r
        rows.append((f"preprocess_data.py --workers {w}", w, r["seconds"], mbs, len(texts) / r["seconds"],
                     r["efficiency"]))

    print(f"\n{'what':<42}{'procs':>6}{'seconds':>9}{'MB/s':>8}{'docs/s':>9}{'eff.':>7}")
    for name, w, s, mbs, dps, eff in rows:
        print(f"{name:<42}{w:>6}{s:>9.2f}{mbs:>8.2f}{dps:>9.0f}{'' if eff is None else f'{eff:.0%}':>7}")
    print("eff. = MB/s / (workers x best ceiling MB/s); preprocessing seconds include loading the "
          "tokenizer, starting workers and writing the files")

    result = {
        "benchmark": "preprocess_throughput",
        "command": shlex.join(
            ["python", "bench/preprocess_throughput.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "environment": {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"},
        "machine": machine_info(),
        "corpus": {"dir": str(args.corpus_dir), "documents": len(texts), "text_bytes": nbytes},
        "tokenizer": args.tokenizer,
        "chunk_size": args.chunk_size,
        "repeats": args.repeats,
        "ceiling": {m: {"seconds": round(s, 4), "mb_per_s": round(ceiling_mbs[m], 4),
                        "docs_per_s": round(len(texts) / s, 2)} for m, s in ceil.items()},
        "preprocess": runs,
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
