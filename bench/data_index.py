#!/usr/bin/env python
"""How long the data indices take to build and to load: GPTDataset's sample index and the blend.

    python bench/data_index.py                       # 10M samples of 2048 tokens, 1M documents
    python bench/data_index.py --samples 1000000 --documents 100000 --repeats 1   # a quick look

Two parts, on synthetic document sizes (no corpus needed), everything measured in this run:

1. ``megatron/data/gpt_dataset.py`` at full size (``--samples`` samples of ``--seq-length``
   tokens over ``--documents`` documents whose sizes are log-normal, median ~1,100 tokens,
   mean ~2,250, seeded):

   * each step of ``build_index_mappings`` (``build_doc_idx``, ``build_sample_idx``,
     ``build_shuffle_idx``, with the same ``RandomState`` draws in the same order);
   * ``GPTDataset(..., cache_dir=...)`` on an empty cache directory (build plus the atomic,
     fsynced ``.npy`` writes of ``build_once_and_load``), and again on the filled one (the
     cached load: three memory maps and the shape checks);
   * the peer for ``build_sample_idx``: Megatron's per-sample loop (its C++ ``build_sample_idx``
     transliterated to Python over the numpy arrays), on a prefix of the same ``doc_idx`` that
     holds ``--loop-samples`` samples; the vectorised function runs on the same prefix, and
     the two results must be equal.

2. ``megatron/data/blended_dataset.py``'s ``build_blending_indices`` for 2, 46 and 300
   datasets (``--datasets``): the compiled C loop (``native=True``) on ``--blend-samples``
   samples, and on ``--fallback-samples`` samples both the C loop and the numpy loop
   (``native=False``), whose indices must be identical. Per-10M figures of the numpy loop are
   extrapolated from ``--fallback-samples`` and labelled so. Weights: 46 datasets get BLOOM's
   46 natural-language shares (``languages.json``), 2 the two largest of them, other counts
   seeded log-normal weights.

Times are medians of ``--repeats`` runs (the cached load: of ``--load-repeats``). The machine is
shared, so the ratios in one run mean more than the absolute seconds. Results go to a table on
stdout and to ``bench/results/data_index.json`` with the machine's details.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_record import describe_machine, write_result  # noqa: E402
from megatron.data.blended_dataset import build_blending_indices  # noqa: E402
from megatron.data.gpt_dataset import (  # noqa: E402
    LAST_EPOCH_SEPARATE_FRACTION,
    GPTDataset,
    build_doc_idx,
    build_sample_idx,
    build_shuffle_idx,
    num_epochs_for,
)
from megatron.data.languages import bloom_mixture_weights, natural_languages  # noqa: E402

TEN_MILLION = 10_000_000


class SyntheticTokens:
    """An ``IndexedDatasetLike`` with only sizes: the index build never reads tokens."""

    def __init__(self, sizes: np.ndarray) -> None:
        self.sizes = sizes

    def __len__(self) -> int:
        return len(self.sizes)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        end = int(self.sizes[idx]) if length is None else offset + length
        return np.zeros(end - offset, dtype=np.int32)


def document_sizes(num_docs: int, seed: int) -> np.ndarray:
    """Log-normal document lengths in tokens (median e^7 ~ 1,100, mean ~2,250), at least 1, int32
    as ``MMapIndexedDataset.sizes``."""
    rng = np.random.default_rng(seed)
    return np.maximum(rng.lognormal(mean=7.0, sigma=1.2, size=num_docs), 1).astype(np.int32)


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls, and the last call's result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def megatron_sample_idx_loop(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int) -> np.ndarray:
    """Megatron's C++ ``build_sample_idx`` (helpers.cpp) as a per-sample Python loop: the peer."""
    num_samples = (int(sizes[doc_idx].sum(dtype=np.int64)) - 1) // seq_length
    sample_idx = np.empty((num_samples + 1, 2), dtype=np.int64)
    doc_idx_index, doc_offset = 0, 0
    sample_idx[0] = (0, 0)
    for sample_index in range(1, num_samples + 1):
        remaining = seq_length + 1
        while remaining != 0:
            doc_length = int(sizes[doc_idx[doc_idx_index]]) - doc_offset
            remaining -= doc_length
            if remaining <= 0:
                doc_offset += remaining + doc_length - 1
                remaining = 0
            else:
                doc_idx_index += 1
                doc_offset = 0
        sample_idx[sample_index] = (doc_idx_index, doc_offset)
    return sample_idx


def build_phases(documents: np.ndarray, sizes: np.ndarray, num_samples: int, seq_length: int,
                 seed: int) -> tuple[dict[str, float], dict, np.ndarray]:
    """``build_index_mappings`` step by step (same code path, same draws): seconds per step,
    the shapes, and ``doc_idx`` (for the loop peer)."""
    times = {}
    start = time.perf_counter()
    tokens_per_epoch = int(sizes[documents].sum(dtype=np.int64))
    num_epochs = num_epochs_for(tokens_per_epoch, seq_length, num_samples)
    rng = np.random.RandomState(seed=seed)
    separate_last_epoch, samples_before_last = False, 0
    if num_epochs > 1:
        samples_before_last = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        samples_per_epoch = (tokens_per_epoch - 1) // seq_length
        separate_last_epoch = (num_samples - samples_before_last
                               < int(LAST_EPOCH_SEPARATE_FRACTION * samples_per_epoch))
    times["setup"] = time.perf_counter() - start
    start = time.perf_counter()
    doc_idx = build_doc_idx(documents, num_epochs, rng, separate_last_epoch)
    times["build_doc_idx"] = time.perf_counter() - start
    start = time.perf_counter()
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length)
    times["build_sample_idx"] = time.perf_counter() - start
    start = time.perf_counter()
    total = sample_idx.shape[0] - 1
    shuffle_idx = build_shuffle_idx(samples_before_last if separate_last_epoch else total, total, rng)
    times["build_shuffle_idx"] = time.perf_counter() - start
    shape = {"tokens_per_epoch": tokens_per_epoch, "epochs": num_epochs, "separate_last_epoch": separate_last_epoch,
             "doc_idx_len": len(doc_idx), "samples_built": total, "shuffle_idx_len": len(shuffle_idx),
             "index_bytes": doc_idx.nbytes + sample_idx.nbytes + shuffle_idx.nbytes}
    return times, shape, doc_idx


def measure_gpt_index(args: argparse.Namespace, tmp_root: Path) -> dict:
    """Part 1: full-size build by steps, GPTDataset cold and cached, the loop peer on a prefix."""
    sizes = document_sizes(args.documents, args.seed)
    documents = np.arange(args.documents, dtype=np.int64)
    dataset = SyntheticTokens(sizes)
    print(f"GPT index: {args.samples:,} samples x {args.seq_length} tokens, {args.documents:,} documents "
          f"({int(sizes.sum(dtype=np.int64)):,} tokens, mean {sizes.mean():,.0f}/document)", flush=True)

    runs, shape, doc_idx = [], {}, None
    for _ in range(args.repeats):
        times, shape, doc_idx = build_phases(documents, sizes, args.samples, args.seq_length, args.seed)
        times["total"] = sum(times.values())
        runs.append(times)
    build = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print("  in memory: " + ", ".join(f"{k} {v:.2f} s" for k, v in build.items()), flush=True)

    cold_times, cache_dir, ds = [], None, None
    for i in range(args.repeats):
        if cache_dir is not None:
            shutil.rmtree(cache_dir)
        cache_dir = tmp_root / f"index-{i}"
        start = time.perf_counter()
        ds = GPTDataset("train", dataset, documents, args.samples, args.seq_length, args.seed, cache_dir=cache_dir)
        cold_times.append(time.perf_counter() - start)
    assert ds is not None and cache_dir is not None
    cached_bytes = sum(p.stat().st_size for p in cache_dir.glob("*.npy"))
    load_s, loaded = median_time(
        lambda: GPTDataset("train", dataset, documents, args.samples, args.seq_length, args.seed, cache_dir=cache_dir),
        args.load_repeats)
    if len(loaded) != shape["samples_built"] or not np.array_equal(loaded.doc_idx, doc_idx):
        raise SystemExit("the cached index differs from the one built in memory")
    print(f"  GPTDataset, empty cache (build + writes): {statistics.median(cold_times):.2f} s; "
          f"cached load: {load_s * 1e3:.1f} ms", flush=True)

    # The peer: a prefix of the same doc_idx holding about --loop-samples samples.
    ends = np.cumsum(sizes[doc_idx], dtype=np.int64)
    prefix = doc_idx[: int(np.searchsorted(ends, args.loop_samples * args.seq_length + 1)) + 1]
    vec_s, vec = median_time(lambda: build_sample_idx(sizes, prefix, args.seq_length), max(args.repeats, 5))
    loop_s, loop = median_time(lambda: megatron_sample_idx_loop(sizes, prefix, args.seq_length), args.repeats)
    identical = bool(np.array_equal(vec, loop))
    if not identical:
        raise SystemExit("build_sample_idx differs from Megatron's per-sample loop")
    n = len(vec) - 1
    print(f"  build_sample_idx on {n:,} samples ({len(prefix):,} documents): vectorised {vec_s * 1e3:.1f} ms, "
          f"per-sample loop {loop_s * 1e3:.0f} ms ({loop_s / vec_s:.0f}x), identical", flush=True)
    return {
        "documents": args.documents, "samples": args.samples, "seq_length": args.seq_length, "seed": args.seed,
        "document_sizes": {"distribution": "lognormal(mean=7.0, sigma=1.2), >= 1", "total_tokens":
                           int(sizes.sum(dtype=np.int64)), "mean": float(sizes.mean()),
                           "median": float(np.median(sizes))},
        "shape": shape,
        "in_memory_build_s": build,
        "in_memory_build_runs_s": runs,
        "gptdataset_empty_cache_s": statistics.median(cold_times),
        "gptdataset_empty_cache_runs_s": cold_times,
        "gptdataset_cached_load_s": load_s,
        "cache_file_bytes": cached_bytes,
        "cache_dir_filesystem": filesystem_of(tmp_root),
        "sample_idx_peer": {"samples": n, "doc_idx_prefix": len(prefix), "vectorised_s": vec_s,
                            "per_sample_loop_s": loop_s, "speedup": loop_s / vec_s, "identical": identical},
    }


def blend_weights(num_datasets: int) -> tuple[str, np.ndarray]:
    """A description and the weights used for ``num_datasets`` datasets (see the docstring)."""
    natural = {lang.code for lang in natural_languages()}
    shares = {code: w for code, w in bloom_mixture_weights().items() if code in natural}
    if num_datasets == len(shares):
        return "BLOOM's 46 natural-language shares", np.array(list(shares.values()))
    if num_datasets < len(shares):
        top = sorted(shares.items(), key=lambda kv: -kv[1])[:num_datasets]
        return f"the {num_datasets} largest BLOOM natural-language shares ({', '.join(c for c, _ in top)})", \
            np.array([w for _, w in top])
    rng = np.random.default_rng(num_datasets)
    return "seeded log-normal(0, 1.5)", rng.lognormal(0.0, 1.5, size=num_datasets)


def measure_blend(args: argparse.Namespace) -> list[dict]:
    """Part 2: C loop at full size; C and numpy loops on the smaller size, compared."""
    build_blending_indices([1.0, 1.0], 10, native=True)  # compile (or load the cached .so) first
    rows = []
    for n in args.datasets:
        what, weights = blend_weights(n)
        c_full_s, _ = median_time(lambda w=weights: build_blending_indices(w, args.blend_samples, native=True),
                                  args.repeats)
        c_small_s, c_small = median_time(
            lambda w=weights: build_blending_indices(w, args.fallback_samples, native=True), args.repeats)
        np_s, np_small = median_time(
            lambda w=weights: build_blending_indices(w, args.fallback_samples, native=False), 1)
        identical = bool(np.array_equal(c_small[0], np_small[0]) and np.array_equal(c_small[1], np_small[1]))
        if not identical:
            raise SystemExit(f"{n} datasets: the C loop and the numpy loop give different indices")
        row = {"datasets": n, "weights": what,
               "c_s": c_full_s, "c_samples": args.blend_samples,
               "c_per_10M_s": c_full_s * TEN_MILLION / args.blend_samples,
               "c_small_s": c_small_s, "numpy_s": np_s, "small_samples": args.fallback_samples,
               "numpy_per_10M_s_extrapolated": np_s * TEN_MILLION / args.fallback_samples,
               "numpy_over_c": np_s / c_small_s, "identical": identical}
        rows.append(row)
        print(f"  blend over {n:>3} datasets: C {c_full_s:.2f} s per {args.blend_samples:,}; on "
              f"{args.fallback_samples:,}: C {c_small_s:.3f} s, numpy {np_s:.1f} s ({row['numpy_over_c']:.0f}x), "
              "identical", flush=True)
    return rows


def filesystem_of(path: Path) -> str | None:
    """The file system type (/proc/mounts) under ``path``: fsync costs differ between them."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    real = os.path.realpath(path)
    best = max((m for m in mounts if real == m[0] or real.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return None if best is None else best[1]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the module docstring's layout in --help."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--samples", type=int, default=TEN_MILLION, help="GPTDataset samples requested")
    p.add_argument("--documents", type=int, default=1_000_000, help="documents of the synthetic dataset")
    p.add_argument("--seq-length", type=int, default=2048, help="tokens per sample")
    p.add_argument("--seed", type=int, default=1234, help="seed of the document sizes and of the index shuffles")
    p.add_argument("--loop-samples", type=int, default=100_000,
                   help="samples for the per-sample loop peer of build_sample_idx")
    p.add_argument("--datasets", type=int, nargs="+", default=[2, 46, 300], help="blend sizes (datasets)")
    p.add_argument("--blend-samples", type=int, default=TEN_MILLION, help="blend samples for the C loop")
    p.add_argument("--fallback-samples", type=int, default=1_000_000,
                   help="blend samples for the numpy loop (and the C loop it is compared with)")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median counts "
                   "(the numpy blend loop runs once)")
    p.add_argument("--load-repeats", type=int, default=7, help="runs of the cached GPTDataset load")
    p.add_argument("--skip-blend", action="store_true", help="measure the GPT index only")
    p.add_argument("--tmp-dir", type=Path, default=None, help="where the index cache is written; unset: $TMPDIR")
    p.add_argument("--output", type=Path, default=Path("bench/results/data_index.json"), help="results JSON")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run both parts, print the table, write the JSON."""
    args = parse_args(argv)
    os.chdir(ROOT)
    info = describe_machine()
    print(f"{info['cpu']}, {info['usable_cores']} usable cores, load {info['load_average_at_start'][0]:.1f}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-data-index-", dir=args.tmp_dir) as tmp:
        gpt = measure_gpt_index(args, Path(tmp))
    blend = [] if args.skip_blend else measure_blend(args)

    b, peer = gpt["in_memory_build_s"], gpt["sample_idx_peer"]
    print(f"\n{'what':<58}{'seconds':>10}")
    for k in ("build_doc_idx", "build_sample_idx", "build_shuffle_idx", "total"):
        print(f"{'  in memory: ' + k:<58}{b[k]:>10.2f}")
    print(f"{'GPTDataset, empty cache (build + writes)':<58}{gpt['gptdataset_empty_cache_s']:>10.2f}")
    print(f"{'GPTDataset, cached load':<58}{gpt['gptdataset_cached_load_s']:>10.4f}")
    print(f"{'build_sample_idx, ' + format(peer['samples'], ',') + ' samples: vectorised':<58}"
          f"{peer['vectorised_s']:>10.4f}")
    print(f"{'  per-sample loop (Megatron C++ in Python)':<58}{peer['per_sample_loop_s']:>10.2f}  "
          f"({peer['speedup']:.0f}x)")
    if blend:
        print(f"\n{'datasets':>8}{'C / 10M s':>11}{'C / 1M s':>10}{'numpy / 1M s':>14}{'numpy/C':>9}"
              f"{'numpy / 10M s (extrap.)':>25}")
        for r in blend:
            print(f"{r['datasets']:>8}{r['c_per_10M_s']:>11.2f}{r['c_small_s']:>10.3f}{r['numpy_s']:>14.2f}"
                  f"{r['numpy_over_c']:>8.0f}x{r['numpy_per_10M_s_extrapolated']:>25.0f}")

    result = {
        "benchmark": "data_index",
        "command": shlex.join(["python", "bench/data_index.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": info,
        "gpt_index": gpt,
        "blend": blend,
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_result(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
