#!/usr/bin/env python
"""Attention memory and speed on CPU: the full ALiBi mask (sdpa_mask) against query blocks (sdpa_chunked).

    python bench/attention_memory.py            # bloom-560m: 16 heads x 64, batch 1; s = 512, 1024, 2048
    python bench/attention_memory.py --seqs 256 --time-seq 256 --repeats 2 --warmup 1   # a quick look

For each sequence length and implementation of ``megatron/model/kernels/attention``, one layer's
attention call on fp32 q, k, v [batch, heads, s, head_dim] (allocated beforehand, not counted):

* **peak**: the most CPU bytes allocated and not yet freed during forward + backward
  (``out.sum().backward()``, gradients of q, k and v), from the profiler's allocation events
  (``profile_memory=True``), which include kernels' scratch buffers;
* **held**: the bytes still allocated when the forward returns: the output plus what autograd
  keeps for the backward. Every layer of a training step holds this until its backward runs.

Implementations: ``sdpa_mask`` (the [1, heads, s, s] float mask); ``sdpa_chunked`` as the
model runs it on CPU (its "cpu_flash" path) with its own block size (``block_size(heads, s)``,
which bounds a block's bias) and with a fixed block (``--fixed-block``), whose peak should grow
linearly in s (heads x block x s); and its "checkpoint" path (what CUDA and dropout take).

Then forward + backward times at ``--time-seq``, for each of ``--time-threads`` intra-op thread
counts: wall and process CPU seconds per call, the variants alternating call by call, medians
(and the fastest call) of ``--repeats`` after ``--warmup``. On a shared machine the one-thread
run is the steadier: with two threads every parallel op waits for the slower thread, and the
chunked path runs more (smaller) ops than the full mask. Results: a table on stdout and
``bench/results/attention_memory.json`` with the machine's details.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_record import describe_machine, write_result  # noqa: E402
from megatron.model.alibi import alibi_slopes  # noqa: E402
from megatron.model.kernels.attention import sdpa_chunked_attention, sdpa_mask_attention  # noqa: E402
from megatron.model.kernels.attention.chunked import block_size  # noqa: E402
from megatron.utils.live_memory import allocation_profile  # noqa: E402

MIB = 2**20


def variants(heads: int, seq: int, fixed_block: int) -> dict[str, Callable]:
    """Name -> attention function; names say the chunked path and block size."""
    auto = block_size(heads, seq)
    return {"sdpa_mask": sdpa_mask_attention,
            f"sdpa_chunked (auto block: {auto})": sdpa_chunked_attention,
            f"sdpa_chunked (fixed block: {fixed_block})": functools.partial(sdpa_chunked_attention, block=fixed_block),
            f"sdpa_chunked, checkpoint ({auto})": functools.partial(sdpa_chunked_attention, path="checkpoint")}


def measure_memory(fn: Callable, shape: tuple[int, int, int, int], slopes: torch.Tensor) -> dict[str, float]:
    """Peak (forward + backward) and held-after-forward MiB of one call of ``fn``."""
    q, k, v = (torch.randn(shape).requires_grad_() for _ in range(3))
    fn(q, k, v, slopes).sum().backward()  # warm-up: one-off allocations out of the way
    q.grad = k.grad = v.grad = None
    peak, _ = allocation_profile(lambda: fn(q, k, v, slopes).sum().backward())
    q.grad = k.grad = v.grad = None
    kept: list[torch.Tensor] = []
    _, held = allocation_profile(lambda: kept.append(fn(q, k, v, slopes)))
    return {"peak_mib": peak / MIB, "held_after_forward_mib": held / MIB}


def time_variants(fns: dict[str, Callable], shape: tuple[int, int, int, int], slopes: torch.Tensor, warmup: int,
                  repeats: int) -> dict[str, dict[str, list[float]]]:
    """{"wall": ..., "cpu": ...}: forward + backward seconds per call and variant, the variants
    alternating call by call."""
    q, k, v = (torch.randn(shape).requires_grad_() for _ in range(3))
    times: dict[str, dict[str, list[float]]] = {clock: {name: [] for name in fns} for clock in ("wall", "cpu")}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            q.grad = k.grad = v.grad = None
            wall, cpu = time.perf_counter(), time.process_time()
            fn(q, k, v, slopes).sum().backward()
            if i >= warmup:
                times["wall"][name].append(time.perf_counter() - wall)
                times["cpu"][name].append(time.process_time() - cpu)
    return times


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the module docstring's layout in --help."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048], help="sequence lengths for memory")
    p.add_argument("--batch", type=int, default=1, help="micro-batch size")
    p.add_argument("--heads", type=int, default=16, help="attention heads (of one TP rank)")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension")
    p.add_argument("--fixed-block", type=int, default=128, help="the fixed query block of the third variant")
    p.add_argument("--time-seq", type=int, default=2048, help="sequence length for the timing")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per variant")
    p.add_argument("--repeats", type=int, default=9, help="timed calls per variant; the median counts")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads for the memory runs; unset: "
                   "torch's default")
    p.add_argument("--time-threads", type=int, nargs="*", default=[1, 2], help="thread counts to time with, "
                   "one after the other; none given: the --threads setting")
    p.add_argument("--output", type=Path, default=Path("bench/results/attention_memory.json"), help="results JSON")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure memory per sequence length, time at one, print the tables, write the JSON."""
    args = parse_args(argv)
    os.chdir(ROOT)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = describe_machine()
    slopes = alibi_slopes(args.heads)
    print(f"{info['cpu']}, {info['threads']} threads, load {info['load_average_at_start'][0]:.1f}; fp32, batch "
          f"{args.batch}, {args.heads} heads x {args.head_dim}", flush=True)

    memory = []
    print(f"\n{'seq':>5}  {'implementation':<40}{'peak MiB':>10}{'held MiB':>10}{'full mask MiB':>15}")
    for seq in args.seqs:
        shape = (args.batch, args.heads, seq, args.head_dim)
        mask_mib = args.heads * seq * seq * 4 / MIB
        for name, fn in variants(args.heads, seq, args.fixed_block).items():
            row = {"seq": seq, "implementation": name, "full_mask_mib": mask_mib,
                   **measure_memory(fn, shape, slopes)}
            memory.append(row)
            print(f"{seq:>5}  {name:<40}{row['peak_mib']:>10.1f}{row['held_after_forward_mib']:>10.1f}"
                  f"{mask_mib:>15.1f}", flush=True)

    shape = (args.batch, args.heads, args.time_seq, args.head_dim)
    fns = variants(args.heads, args.time_seq, args.fixed_block)
    timing = {}
    for threads in args.time_threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        times = time_variants(fns, shape, slopes, args.warmup, args.repeats)
        median = {clock: {name: statistics.median(t) for name, t in by_name.items()}
                  for clock, by_name in times.items()}
        fastest = {name: min(t) for name, t in times["wall"].items()}
        ratio = {"wall": {name: m / median["wall"]["sdpa_mask"] for name, m in median["wall"].items()},
                 "wall_fastest": {name: m / fastest["sdpa_mask"] for name, m in fastest.items()},
                 "cpu": {name: m / median["cpu"]["sdpa_mask"] for name, m in median["cpu"].items()}}
        timing[str(threads)] = {"median_s": median, "fastest_wall_s": fastest, "ratio_to_sdpa_mask": ratio,
                                "times_s": times, "load_average_after": os.getloadavg()}
        print(f"\nforward + backward at s={args.time_seq}, {threads} thread(s), {args.repeats} calls each: "
              f"ms (/ sdpa_mask)")
        print(f"  {'implementation':<40}{'wall, median':>18}{'wall, fastest':>18}{'CPU, median':>18}")
        for name in fns:
            print(f"  {name:<40}{median['wall'][name] * 1e3:>9.1f} ({ratio['wall'][name]:.2f}x)"
                  f"{fastest[name] * 1e3:>10.1f} ({ratio['wall_fastest'][name]:.2f}x)"
                  f"{median['cpu'][name] * 1e3:>10.1f} ({ratio['cpu'][name]:.2f}x)", flush=True)

    result = {
        "benchmark": "attention_memory",
        "command": shlex.join(["python", "bench/attention_memory.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": info,
        "config": {"dtype": "float32", "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim,
                   "seqs": args.seqs, "fixed_block": args.fixed_block, "time_seq": args.time_seq,
                   "time_threads": args.time_threads},
        "measured": {"peak_mib": "max bytes allocated and not freed during out.sum().backward() of one call, "
                                 "profiler allocation events, inputs excluded",
                     "held_after_forward_mib": "bytes still allocated when the forward returns (output + saved "
                                               "for backward)",
                     "time": "forward + backward seconds per call, wall and process CPU time, variants "
                             "alternating"},
        "memory": memory,
        "timing_by_threads": timing,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_result(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
