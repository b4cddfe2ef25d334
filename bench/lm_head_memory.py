#!/usr/bin/env python
"""Peak memory of the LM head + loss, forward and backward: fused linear cross entropy vs plain.

    python bench/lm_head_memory.py                       # bloom-560m's head: h 1024, V 250,880, 2048 tokens
    python bench/lm_head_memory.py --tokens 256          # a quick look

Runs ``losses = fn(hidden [N, h], weight [V, h], labels [N]).mean()`` then ``backward()`` in fp32
on the CPU, where ``fn`` is ``megatron/model/kernels/linear_cross_entropy.py``'s
``fused_linear_cross_entropy`` (token chunks, no [N, V] logits) or
``reference_linear_cross_entropy`` (``F.linear``, then ``F.cross_entropy`` on the fp32 logits),
and records the peak of the memory that this computation allocates, NOT counting the weight
(allocated before) nor its gradient (allocated inside the backward, but a cost every variant
pays, like the weight). ``hidden`` is allocated before too; its gradient is counted.

How the memory is measured, two ways in the same run:

* **tracked** (the number that counts): ``megatron/utils/live_memory.py``'s ``LiveStorageBytes``,
  a ``TorchDispatchMode`` that records every tensor storage an ATen op allocates, forward and
  backward, and (through a finalizer on the storage) when the allocator gets it back, also for
  tensors that only autograd holds; the allocation that ends up as ``weight.grad`` is left out
  of the peak. It does not see memory a kernel allocates for itself and frees before
  returning (matmul packing buffers, a few MB).
* **allocator** (a cross-check): ``torch.profiler`` with ``profile_memory=True`` records every
  allocation and release of the CPU allocator; their running sum from the start of the run
  peaks at the allocator's high-water mark above the baseline. It includes kernel-internal
  buffers and the weight's gradient (which it cannot tell apart), so it should be about
  tracked + the gradient (1 GB at this shape) where the gradient is live at the peak.

Also recorded: wall time of each run (the fused one does one more [N, h] x [h, V] product, to
recompute the logits in the backward), and the differences between the two variants' loss and
gradients at this size. Results: a table on stdout and ``bench/results/lm_head_memory.json``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_record import describe_machine, write_result  # noqa: E402
from megatron.model.kernels.linear_cross_entropy import (  # noqa: E402
    default_chunk_tokens,
    fused_linear_cross_entropy,
    reference_linear_cross_entropy,
)
from megatron.utils.live_memory import LiveStorageBytes  # noqa: E402

MIB = 2**20


def allocator_peak(prof: profile) -> int:
    """High-water mark of the CPU allocator above its level at the start of ``prof``."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    now = peak = 0
    for _, delta in events:
        now += delta
        peak = max(peak, now)
    return peak


def measure(fn: Callable, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
            chunk_tokens: Optional[int]) -> dict:
    """One forward + backward of ``fn``: peak bytes (tracked, allocator), seconds, loss and gradients."""
    hidden = hidden.clone().requires_grad_()  # made outside the tracker, as the model's hidden state would be
    weight.grad = None
    tracker = LiveStorageBytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, tracker:
        start = time.perf_counter()
        loss = fn(hidden, weight, labels, chunk_tokens=chunk_tokens).mean()
        loss.backward()
        seconds = time.perf_counter() - start
    return {"tracked_peak_bytes": tracker.peak(exclude=[tracker.allocation_of(weight.grad)]),
            "allocator_peak_bytes": allocator_peak(prof), "seconds": seconds,
            "loss": loss.item(), "grad_hidden": hidden.grad, "grad_weight": weight.grad}


def rel_max(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference relative to the largest expected magnitude."""
    return ((got - expected).abs().max() / expected.abs().max()).item()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (bloom-560m: 1024)")
    p.add_argument("--vocab", type=int, default=250_880, help="padded vocabulary (BLOOM: 250,880)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per micro-batch: sequence x micro-batch")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="tokens per chunk of the fused kernel (default: its own, ~64 MB of fp32 logits)")
    p.add_argument("--init-std", type=float, default=0.0048, help="std of the random weight (BLOOM's init)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--output", type=Path, default=Path("bench/results/lm_head_memory.json"), help="results JSON")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure both variants, print the table, write the JSON."""
    args = parse_args(argv)
    info = describe_machine()
    gen = torch.Generator().manual_seed(args.seed)
    hidden = torch.randn(args.tokens, args.hidden, generator=gen)  # unit scale, as after the final LayerNorm
    weight = torch.empty(args.vocab, args.hidden).normal_(0.0, args.init_std, generator=gen).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=gen)
    chunk = args.chunk_tokens or default_chunk_tokens(args.vocab)
    print(f"{info['cpu']}, {info['threads']} threads, load {info['load_average_at_start'][0]:.1f}; fp32, "
          f"hidden {args.hidden}, vocab {args.vocab:,}, {args.tokens} tokens, fused chunk {chunk} tokens "
          f"({chunk * args.vocab * 4 / MIB:.0f} MiB of fp32 logits)", flush=True)

    runs = {"fused": measure(fused_linear_cross_entropy, hidden, weight, labels, chunk)}
    runs["reference"] = measure(reference_linear_cross_entropy, hidden, weight, labels, None)
    fused, ref = runs["fused"], runs["reference"]
    agreement = {"loss_abs": abs(fused["loss"] - ref["loss"]),
                 "grad_hidden_rel_max": rel_max(fused["grad_hidden"], ref["grad_hidden"]),
                 "grad_weight_rel_max": rel_max(fused["grad_weight"], ref["grad_weight"])}
    ratio = ref["tracked_peak_bytes"] / fused["tracked_peak_bytes"]

    print(f"\n{'variant':<10}{'tracked peak MiB':>18}{'allocator peak MiB':>20}{'seconds':>9}{'loss':>10}")
    for name, r in runs.items():
        print(f"{name:<10}{r['tracked_peak_bytes'] / MIB:>18,.1f}{r['allocator_peak_bytes'] / MIB:>20,.1f}"
              f"{r['seconds']:>9.1f}{r['loss']:>10.5f}")
    print(f"reference / fused (tracked): {ratio:.1f}x; differences {agreement}")

    result = {
        "benchmark": "lm_head_memory",
        "command": shlex.join(["python", "bench/lm_head_memory.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": info,
        "config": {"dtype": "float32", "hidden": args.hidden, "vocab": args.vocab, "tokens": args.tokens,
                   "fused_chunk_tokens": chunk, "fused_chunk_logits_mib": chunk * args.vocab * 4 / MIB,
                   "weight_mib": args.vocab * args.hidden * 4 / MIB},
        "measured": "losses.mean().backward() of fn(hidden, weight, labels); peak bytes allocated during it, "
                    "tracked: tensor storages, without weight and weight.grad; allocator: torch.profiler CPU "
                    "allocator events, with weight.grad",
        "runs": {name: {k: v for k, v in r.items() if not k.startswith("grad_")} for name, r in runs.items()},
        "reference_over_fused_tracked": ratio,
        "agreement": agreement,
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_result(ROOT / args.output if not args.output.is_absolute() else args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
