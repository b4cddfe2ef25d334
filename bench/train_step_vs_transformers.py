#!/usr/bin/env python
"""One training step of our BLOOM against transformers' BloomForCausalLM and against this
machine's matmul-bound limit, with the contribution of each kernel (ablation), same process,
same weights, same batches.

    python bench/train_step_vs_transformers.py                  # the machine's native precision
    python bench/train_step_vs_transformers.py --precision fp32 --steps 5

A step is forward, fp32 cross entropy, backward, AdamW step, zero_grad:

* ours: ``model(tokens, labels)`` through the kernels the registry picks for this device
  (megatron/model/kernels), AdamW as ``optimizer.adam_implementation: auto`` picks it;
* transformers: ``BloomForCausalLM`` with its own loss recipe (logits upcast to fp32, then
  ``F.cross_entropy``) and the AdamW its ``Trainer`` defaults to with torch >= 2.8 (``fused``);
* ablations: ours with one kernel at a time put back to its reference (only the kernels whose
  choice on this device differs from the reference), and ours with every kernel at its reference.

The matmul-bound limit: one transformers step runs under a dispatch recorder that notes every
matrix product (``mm``, ``addmm``, ``bmm``, ``baddbmm``: the whole model's matmul work, forward
and backward, attention included); each distinct product is then timed alone on random inputs
of the same shapes, strides and dtype, and the limit is the sum over the step's products of
their median times. That is the step's matmul FLOPs divided by the throughput this machine
reaches on exactly those shapes, measured in the same run as the steps: a few timings before
them and one after every round of steps, so the limit sees the machine's fast and slow phases
as the steps do, and is compared with the steps' medians (``MatmulLimit``).

Where ours' time beyond the limit goes: one more step of ours runs under the profiler, its time
split into matrix products (and their in-step GFLOP/s against the limit's), the CPU attention
kernels, and everything else.

Precision: ``auto`` is the machine's native one (bf16 autocast where the CPU computes bf16 in
hardware, fp32 where bf16 would be emulated), decided by megatron/training/precision.py as a
training run decides it. Models alternate step by step (A B C A B C ...) so machine noise hits
all alike, and the products are timed once after every round. On a shared machine whose speed
drifts within minutes, ratios are taken within a round and then their median: "x limit" is the
median over rounds of a step's time over that round's limit, "vs transformers" the median of
transformers' time over ours in the same round. Seconds per step are plain medians after
warm-up. Results: bench/results/train_step_vs_transformers[_PRECISION].json.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_record import describe_machine, write_result  # noqa: E402
from megatron.config import ModelConfig, OptimizerConfig  # noqa: E402
from megatron.convert.hf_mapping import ours_to_hf_state_dict  # noqa: E402
from megatron.model.bloom import build_model  # noqa: E402
from megatron.model.kernels import select_adam, select_kernels  # noqa: E402
from megatron.training.precision import AUTO, choose_precision  # noqa: E402

aten = torch.ops.aten
MATMULS = {aten.mm.default: "mm", aten.addmm.default: "addmm", aten.bmm.default: "bmm",
           aten.baddbmm.default: "baddbmm"}


# --- the matmul-bound limit -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MatmulCall:
    """One matrix product as dispatched: enough to replay it on random data."""

    op: str
    tensors: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]  # (shape, stride) of each tensor argument
    dtype: torch.dtype
    scalars: tuple[tuple[str, float], ...]  # beta / alpha of addmm and baddbmm

    @property
    def flops(self) -> int:
        """2 m n k (times the batch for bmm/baddbmm): the products' multiply-adds, counted twice."""
        a, b = self.tensors[-2][0], self.tensors[-1][0]
        batch = a[0] if len(a) == 3 else 1
        return 2 * batch * a[-2] * a[-1] * b[-1]


class MatmulRecorder(TorchDispatchMode):
    """Counts every matrix product dispatched while active, by :class:`MatmulCall`."""

    def __init__(self):
        super().__init__()
        self.calls: Counter[MatmulCall] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMULS:
            tensors = tuple((tuple(t.shape), tuple(t.stride())) for t in args if isinstance(t, torch.Tensor))
            dtype = next(t.dtype for t in args if isinstance(t, torch.Tensor))
            self.calls[MatmulCall(MATMULS[func], tensors, dtype, tuple(sorted(kwargs.items())))] += 1
        return func(*args, **kwargs)


def _random_strided(shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    storage = 1 + sum((n - 1) * s for n, s in zip(shape, stride))
    return torch.randn(storage, dtype=dtype).as_strided(shape, stride)


class MatmulLimit:
    """Each distinct product of a step, timed between the steps.

    A shared machine's speed drifts by several percent over minutes, so products timed once
    before the steps would be compared with steps run in another phase. Each :meth:`sample`
    times every distinct product once, on random inputs of its shapes, strides and dtype kept
    from the start; the bench samples after every round of steps. The limit takes each product's
    median time, as the steps are compared by their medians: like with like. The sum of the best
    times (the machine at its fastest on every shape at once) is reported beside it."""

    def __init__(self, calls: Counter):
        self.calls = calls
        self.args = {call: [_random_strided(shape, stride, call.dtype) for shape, stride in call.tensors]
                     for call in calls}
        self.times: dict[MatmulCall, list[float]] = {call: [] for call in calls}
        for call in calls:  # warm-up: first-call allocations and oneDNN primitive creation
            self._run(call)

    def _run(self, call: MatmulCall) -> float:
        op = getattr(aten, call.op).default
        start = time.perf_counter()
        op(*self.args[call], **dict(call.scalars))
        return time.perf_counter() - start

    def sample(self) -> float:
        """Time every distinct product once more; return this sample's limit (seconds)."""
        for call in self.calls:
            self.times[call].append(self._run(call))
        return sum(self.times[call][-1] * n for call, n in self.calls.items())

    def result(self) -> dict:
        """The step's matmul FLOPs, the seconds this machine needs for them (medians, and bests),
        and the throughput."""
        flops = sum(call.flops * n for call, n in self.calls.items())
        seconds = sum(statistics.median(self.times[call]) * n for call, n in self.calls.items())
        best = sum(min(self.times[call]) * n for call, n in self.calls.items())
        return {"matmul_gflop": flops / 1e9, "limit_seconds": seconds, "gflops_per_second": flops / seconds / 1e9,
                "limit_seconds_from_best_times": best, "gflops_per_second_best": flops / best / 1e9,
                "distinct_shapes": len(self.calls), "products": sum(self.calls.values()),
                "timings_per_product": len(next(iter(self.times.values()), []))}


def step_time_split(step: Callable[[torch.Tensor], float], batch: torch.Tensor) -> dict:
    """One profiled step, its CPU time split into matrix products, attention kernels and the rest
    (elementwise, copies, optimizer, Python): where a step's time beyond the limit goes."""
    from torch.profiler import ProfilerActivity, profile

    groups = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
              "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                            "aten::_scaled_dot_product_flash_attention_for_cpu_backward")}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step(batch)
        wall = time.perf_counter() - start
    split = {name: 0.0 for name in groups}
    for event in prof.key_averages():
        for name, ops in groups.items():
            if event.key in ops:
                split[name] += event.self_cpu_time_total / 1e6
    split["other"] = wall - sum(split.values())
    split["wall"] = wall
    return split


# --- the steps ------------------------------------------------------------------------------

def make_step(loss_fn: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
              autocast: bool) -> Callable[[torch.Tensor], float]:
    """A closure running one full training step on a batch of ``seq + 1`` tokens per row."""

    def step(tokens: torch.Tensor) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def adamw(params, implementation: str) -> torch.optim.Optimizer:
    """torch AdamW as our registry's ``implementation`` builds it (its DeepSpeed parameters)."""
    choice = select_adam(OptimizerConfig(adam_implementation=implementation), "cpu")
    options = {k: v for k, v in choice.fn().items() if k != "torch_adam"}
    return torch.optim.AdamW(params, lr=1e-4, **options)


def ours_variant(cfg: ModelConfig, state: dict, adam: str, autocast: bool, **overrides):
    """Our model with ``overrides`` on the model config, the weights ``state``, and its step."""
    variant_cfg = dataclasses.replace(cfg, **overrides)
    kernels = select_kernels(variant_cfg, "cpu", torch.bfloat16 if autocast else torch.float32)
    model = build_model(variant_cfg, kernels=kernels)
    model.load_state_dict(state)
    model.train()
    choice = select_adam(OptimizerConfig(adam_implementation=adam), "cpu")
    step = make_step(lambda t: model(t[:, :-1], labels=t[:, 1:]), adamw(model.parameters(), adam), autocast)
    return step, kernels.describe() + f", adamw={choice.name}"


def transformers_step(cfg: ModelConfig, state: dict, autocast: bool):
    """transformers' BloomForCausalLM with our weights, its loss recipe and its Trainer's AdamW."""
    from transformers import BloomConfig, BloomForCausalLM

    hf = BloomForCausalLM(BloomConfig(vocab_size=cfg.padded_vocab_size(), hidden_size=cfg.hidden_size,
                                      n_layer=cfg.num_layers, n_head=cfg.num_attention_heads, hidden_dropout=0.0,
                                      attention_dropout=0.0))
    hf.load_state_dict(ours_to_hf_state_dict(state))
    hf.train()

    def loss(tokens: torch.Tensor) -> torch.Tensor:
        logits = hf(tokens[:, :-1]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())

    return make_step(loss, adamw(hf.parameters(), "torch_fused"), autocast), hf


def main(argv=None) -> int:
    """Measure the steps, the matmul-bound limit and the ablations; print a table; write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="measured steps per model")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timings per distinct matmul before the steps (one more follows every round of steps; "
                             "the limit takes each product's median)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: the machine's native precision (as training.bf16=auto decides)")
    parser.add_argument("--no-ablation", action="store_true", help="only ours (auto) and transformers")
    parser.add_argument("--output", type=Path, default=None, help="default bench/results/train_step_vs_transformers"
                                                                  "[_bf16].json")
    args = parser.parse_args(argv)

    precision = choose_precision(AUTO if args.precision == "auto" else args.precision == "bf16", False,
                                 torch.device("cpu"))
    autocast = precision.bf16
    print(f"precision: {precision.name} ({precision.reason})", flush=True)
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                      vocab_size=args.vocab, seq_length=args.seq, init_method_std=0.02, hidden_dropout=0.0,
                      attention_dropout=0.0)
    state = build_model(cfg).state_dict()

    steps: dict[str, Callable] = {}
    kernels: dict[str, str] = {}
    steps["ours"], kernels["ours"] = ours_variant(cfg, state, "auto", autocast)
    steps["transformers"], hf = transformers_step(cfg, state, autocast)
    kernels["transformers"] = "eager attention with a materialised ALiBi bias, fp32 logits, adamw=torch fused"
    if not args.no_ablation:
        auto = select_kernels(cfg, "cpu", torch.bfloat16 if autocast else torch.float32)
        reference = {"attention": {"attention_implementation": "reference"},
                     "cross_entropy": {"cross_entropy_loss_fusion": False},
                     "bias_gelu": {"bias_gelu_fusion": False},
                     "bias_dropout_add": {"bias_dropout_fusion": False}}
        if auto.attention.name != "sdpa_mask":  # the implementation before the registry
            steps["ours, attention=sdpa_mask"], kernels["ours, attention=sdpa_mask"] = ours_variant(
                cfg, state, "auto", autocast, attention_implementation="sdpa_mask")
        for kernel, overrides in reference.items():
            if getattr(auto, kernel).name != "reference":
                name = f"ours, {kernel}=reference"
                steps[name], kernels[name] = ours_variant(cfg, state, "auto", autocast, **overrides)
        steps["ours, adamw=torch_for_loop"], kernels["ours, adamw=torch_for_loop"] = ours_variant(
            cfg, state, "torch_for_loop", autocast)
        steps["ours, every kernel reference"], kernels["ours, every kernel reference"] = ours_variant(
            cfg, state, "torch_for_loop", autocast, use_fused_kernels=False)

    batches = [torch.randint(0, args.vocab, (args.batch, args.seq + 1)) for _ in range(args.warmup + args.steps)]
    recorder = MatmulRecorder()
    with recorder:  # one extra transformers step, recorded, not timed
        steps["transformers"](batches[0])
    limiter = MatmulLimit(recorder.calls)
    for _ in range(args.repeats):
        limiter.sample()
    ours_recorder = MatmulRecorder()
    with ours_recorder:
        steps["ours"](batches[0])
    ours_gflop = sum(c.flops * n for c, n in ours_recorder.calls.items()) / 1e9

    times = {name: [] for name in steps}
    losses = {name: [] for name in steps}
    ratios = {name: [] for name in steps}  # each step over the limit sampled right after its round
    for i, batch in enumerate(batches):
        for name, step in steps.items():
            start = time.perf_counter()
            losses[name].append(step(batch))
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
        round_limit = limiter.sample()
        if i >= args.warmup:
            for name in steps:
                ratios[name].append(times[name][-1] / round_limit)
        print(f"  step {i + 1}/{len(batches)} done", flush=True)
    limit = limiter.result()
    print(f"matmul-bound limit: {limit['matmul_gflop']:.0f} GFLOP in {limit['products']} products "
          f"({limit['distinct_shapes']} shapes) at {limit['gflops_per_second']:.1f} GFLOP/s = "
          f"{limit['limit_seconds']:.2f} s (each product's median of {limit['timings_per_product']} timings taken "
          f"between the steps; from the best timings: {limit['limit_seconds_from_best_times']:.2f} s)", flush=True)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    x_limit = {name: statistics.median(r) for name, r in ratios.items()}
    speedup = {name: statistics.median(hf / t for hf, t in zip(times["transformers"], times[name])) for name in steps}

    print(f"\nconfig: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}, seq "
          f"{args.seq}, batch {args.batch}, {precision.name}; medians of {args.steps} steps")
    print(f"{'':<32} {'s/step':>8} {'x limit':>8} {'vs transformers':>16}")
    for name in steps:
        print(f"{name:<32} {seconds[name]:8.2f} {x_limit[name]:8.2f} "
              f"{speedup[name]:15.2f}x")
    print(f"first-step losses: ours {losses['ours'][0]:.6f}, transformers {losses['transformers'][0]:.6f}")
    print(f"(ours dispatches {ours_gflop:.0f} GFLOP of plain matmuls; its attention runs inside SDPA)")
    split = step_time_split(steps["ours"], batches[-1])
    print(f"ours, one profiled step: {split['wall']:.2f} s = matmuls {split['matmul']:.2f} s "
          f"({ours_gflop / split['matmul']:.0f} GFLOP/s against {limit['gflops_per_second']:.0f} alone) + "
          f"attention kernels {split['attention']:.2f} s + everything else {split['other']:.2f} s")

    suffix = "" if precision.name == "fp32" else f"_{precision.name}"
    output = args.output or ROOT / f"bench/results/train_step_vs_transformers{suffix}.json"
    write_result(output, {
        "command": "python " + " ".join(["bench/train_step_vs_transformers.py",
                                         *(argv if argv is not None else sys.argv[1:])]),
        "machine": describe_machine(),
        "config": {k: v for k, v in vars(args).items() if k != "output"} | {"precision": precision.name,
                                                                               "precision_reason": precision.reason},
        "matmul_limit": limit,
        "ours_dispatched_matmul_gflop": ours_gflop,
        "ours_profiled_step_seconds": split,
        "seconds_per_step": seconds,
        "x_limit": x_limit,
        "x_limit_per_round": ratios,
        "speedup_over_transformers": speedup,
        "kernels": kernels,
        "all_step_seconds": times,
        "first_step_loss": {name: values[0] for name, values in losses.items()},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
