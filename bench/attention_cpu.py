#!/usr/bin/env python
"""CPU attention kernel speed by input dtype: fp32 against bf16, with the 4-D ALiBi + causal mask.

    python bench/attention_cpu.py                    # batch 4, 8 heads, seq 512, head dim 64
    python bench/attention_cpu.py --repeats 20 --seq 1024

Measures ``torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)``, forward
and backward (``out.sum().backward()``, gradients for q, k and v), where ``bias`` is the float
ALiBi + causal mask of shape [1, heads, s, s] (``megatron.model.alibi``'s slopes and
``alibi_causal_bias``, in the inputs' dtype), and the forward alone (under ``torch.no_grad``), for:

* ``fp32``: fp32 q, k, v and mask;
* ``bf16``: bf16 q, k, v and mask, straight into the kernel;
* ``bf16 via sdpa_mask_attention``: bf16 inputs through ``megatron/model/kernels/attention``'s
  full-mask path, which on CPU casts them to fp32, attends, and casts the output back (what the
  model ran before the query-block path, ``sdpa_chunked``; see bench/attention_memory.py).

The variants alternate call by call (A B C A B C ..., each forward+backward followed by its
forward) so drifts in machine load hit all alike;
each gets ``--warmup`` untimed calls first, then the median of ``--repeats`` timed calls is
reported with the ratios to fp32. One profiled call per variant records which ATen attention
kernel ran (a 4-D mask should select ``_scaled_dot_product_flash_attention_for_cpu``). Results
go to a table on stdout and to ``bench/results/attention_cpu.json`` with the machine's details
(CPU features: bf16 is emulated without AVX-512 BF16 or AMX).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_record import describe_machine, write_result  # noqa: E402
from megatron.model.alibi import alibi_causal_bias, alibi_slopes  # noqa: E402
from megatron.model.kernels.attention import sdpa_mask_attention  # noqa: E402


def make_variant(name: str, shape: tuple[int, int, int, int], slopes: torch.Tensor,
                 seed: int) -> dict[str, Callable[[], None]]:
    """``{"forward": ..., "forward+backward": ...}``: one call of the variant ``name`` on fixed random
    inputs, without autograd and with the backward."""
    batch, heads, seq, head_dim = shape
    dtype = torch.float32 if name == "fp32" else torch.bfloat16
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    if name == "bf16 via sdpa_mask_attention":
        def attend() -> torch.Tensor:
            return sdpa_mask_attention(q, k, v, slopes)
    else:
        bias = alibi_causal_bias(slopes, seq, dtype=dtype)[None]  # [1, heads, s, s]: the flash kernel

        def attend() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    def forward() -> None:
        with torch.no_grad():
            attend()

    def forward_backward() -> None:
        for t in (q, k, v):
            t.grad = None
        attend().sum().backward()

    return {"forward": forward, "forward+backward": forward_backward}


def attention_kernels(fn: Callable[[], None]) -> list[str]:
    """The ATen scaled-dot-product / attention ops one call of ``fn`` ran (forward and backward)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key for e in prof.key_averages() if "attention" in e.key or "scaled_dot" in e.key}
    return sorted(names)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the module docstring's layout in --help."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--batch", type=int, default=4, help="batch size")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--seq", type=int, default=512, help="sequence length")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per variant")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per variant; the median counts")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads; unset: torch's "
                   "default, which follows OMP_NUM_THREADS")
    p.add_argument("--output", type=Path, default=Path("bench/results/attention_cpu.json"), help="results JSON")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Time the variants, print the table, write the JSON."""
    args = parse_args(argv)
    os.chdir(ROOT)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = describe_machine()
    shape = (args.batch, args.heads, args.seq, args.head_dim)
    print(f"{info['cpu']}, {info['cpu_features']['capability']}, {info['threads']} threads, load "
          f"{info['load_average_at_start'][0]:.1f}; q, k, v {list(shape)}, mask [1, {args.heads}, {args.seq}, "
          f"{args.seq}]", flush=True)
    slopes = alibi_slopes(args.heads)
    names = ["fp32", "bf16", "bf16 via sdpa_mask_attention"]
    passes = ["forward+backward", "forward"]
    variants = {name: make_variant(name, shape, slopes, args.seed) for name in names}
    kernels = {name: attention_kernels(fns["forward+backward"]) for name, fns in variants.items()}
    for _ in range(args.warmup):
        for fns in variants.values():
            for p in passes:
                fns[p]()
    times: dict[str, dict[str, list[float]]] = {p: {name: [] for name in names} for p in passes}
    for _ in range(args.repeats):
        for name, fns in variants.items():
            for p in passes:
                start = time.perf_counter()
                fns[p]()
                times[p][name].append(time.perf_counter() - start)
    median = {p: {name: statistics.median(t) for name, t in by_name.items()} for p, by_name in times.items()}
    ratio = {p: {name: m[name] / m["fp32"] for name in names} for p, m in median.items()}

    print(f"\n{'inputs':<32}{'fwd+bwd ms':>11}{'/ fp32':>8}{'fwd ms':>9}{'/ fp32':>8}  kernel")
    for name in names:
        kernel = ", ".join(k.removeprefix("aten::") for k in kernels[name] if "backward" not in k)
        fb, f = median["forward+backward"][name], median["forward"][name]
        print(f"{name:<32}{fb * 1e3:>11.1f}{ratio['forward+backward'][name]:>7.2f}x{f * 1e3:>9.1f}"
              f"{ratio['forward'][name]:>7.2f}x  {kernel}")

    result = {
        "benchmark": "attention_cpu",
        "command": shlex.join(["python", "bench/attention_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": info,
        "shape": {"batch": args.batch, "heads": args.heads, "seq": args.seq, "head_dim": args.head_dim,
                  "mask": [1, args.heads, args.seq, args.seq]},
        "measured": {"forward+backward": "out.sum().backward(), grads of q, k, v",
                     "forward": "under torch.no_grad()"},
        "warmup": args.warmup,
        "repeats": args.repeats,
        "median_s": median,
        "ratio_to_fp32": ratio,
        "times_s": times,
        "aten_kernels": kernels,
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_result(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
