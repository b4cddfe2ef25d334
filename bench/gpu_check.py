#!/usr/bin/env python
"""GPU check: every kernel against its reference on the device, then BLOOM-1b7-shaped training steps.

    bash bench/gpu_check.sh                        # on a CUDA machine: everything, killed at 7.5 minutes
    python bench/gpu_check.py --cpu-smoke          # the same code paths on CPU at a tiny shape
    python bench/gpu_check.py --variants auto reference attention=reference --steps 10

1. Kernel checks. For every kernel in megatron/model/kernels' IMPLEMENTATIONS and every
   implementation that the device can run (``unavailable(device, cfg, dtype)`` is None), forward and
   backward on small random inputs against the kernel's ``reference`` implementation, in fp32
   (tight) and bf16 (loose): the norm-relative error of the output and of each input gradient.
   A kernel this script has no input builder for is recorded as such, not failed.
2. Training steps at the config's shape (configs/bloom-1b7.yaml: 24 layers, hidden 2048, 16 heads,
   vocabulary 250,880, sequence 2048) on one device, for each kernel choice (``auto``: the
   registry's choice for the device; ``reference``: ``model.use_fused_kernels=false``; or
   ``kernel=implementation,...`` on top of ``auto``), without and with activation recompute
   (every layer, ``checkpoint_num_layers=1``), then transformers' ``BloomForCausalLM`` of the
   same shape without and with gradient checkpointing. Precision as DeepSpeed's bf16 training:
   the model's weights, activations and gradients are bf16; an fp32 master copy of the weights
   and the AdamW state (torch's ``fused=True`` kernel) live outside the model, gradients are
   cast to fp32 into the masters, clipped at 1.0, stepped and copied back. No autocast. A step
   is forward, ``language_model_loss`` (the variant's cross entropy) on random token ids,
   backward, optimizer step. The micro-batch is the largest power of two that fits (tried
   1, 2, 4, ... up to ``--max-micro-batch``, one step each (two for the first size, whose first
   step compiles), until CUDA runs out of memory or the next size would not fit the variant's
   time), unless ``--micro-batch`` fixes it; then ``--warmup`` steps and ``--steps`` timed steps,
   each ended by ``torch.cuda.synchronize()``. Recorded per variant: median ms per step,
   tokens/s, model and hardware TFLOP/s (Megatron's formula, megatron/training/metrics.py),
   MFU against the device's dense bf16 peak, peak memory (``max_memory_allocated``). Also the
   first-step loss of each of our models (same weights and batch whatever the kernels) and its
   difference from the reference's: the fused kernels checked end to end.
3. ``--cpu-smoke``: all of the above on CPU at 2 layers, hidden 64, 4 heads, vocabulary 512,
   sequence 32, micro-batches up to 2, one timed step; MFU and peak memory are null there.

Time: ``--time-budget`` seconds from the start of this process (default 420; gpu_check.sh also
kills it at 7.5 minutes). Each phase gets a share of what is left; a variant that would run past
its share shrinks its timed steps or is recorded as "skipped: time budget". The results file
is rewritten after every phase, so a killed run leaves what it measured.

Results: bench/results/gpu_check.json (``--cpu-smoke``: bench/results/gpu_check_cpu_smoke.json,
so a smoke run never overwrites GPU figures), and a table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import shlex
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

START = time.monotonic()
# Before torch is imported: less fragmentation after the out-of-memory probes of the micro-batch search.
if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_record import describe_machine, write_result  # noqa: E402
from megatron.config import ModelConfig, load_config  # noqa: E402
from megatron.model.alibi import alibi_slopes  # noqa: E402
from megatron.model.bloom import build_model, language_model_loss  # noqa: E402
from megatron.model.kernels import IMPLEMENTATIONS, KernelChoice, Kernels, select_kernels  # noqa: E402
from megatron.training.metrics import throughput  # noqa: E402
from megatron.utils.atomic import atomic_write_text  # noqa: E402

IMPORTS_S = time.monotonic() - START

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a piece of torch.cuda.get_device_name();
# the first match wins, so the more specific names come first.
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("GH200", 989.4e12),
    ("H200", 989.4e12),
    ("H100", 989.4e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("A100", 312e12),
)

# Norm-relative error allowed against the reference: ||out - ref|| / ||ref||.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}

# The tiny shape of --cpu-smoke.
SMOKE_MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=512, seq_length=32,
                   init_method_std=0.02)


class Stopped(BaseException):
    """SIGTERM (gpu_check.sh's timeout): write what was measured and stop (a BaseException, so
    that no ``except Exception`` recording a failed check or variant swallows it)."""


def _on_sigterm(signum, frame):
    raise Stopped("SIGTERM (time limit of gpu_check.sh)")


def log(message: str) -> None:
    """A progress line, with the seconds since the start."""
    print(f"[{time.monotonic() - START:6.1f} s] {message}", flush=True)


class Clock:
    """The run's deadline and each phase's share of it."""

    def __init__(self, budget_s: float, reserve_s: float = 5.0):
        self.deadline = START + budget_s - reserve_s

    def elapsed(self) -> float:
        return time.monotonic() - START

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def share(self, parts_left: int) -> float:
        """Deadline for the next of ``parts_left`` equal shares of the remaining time."""
        return time.monotonic() + max(0.0, self.left()) / max(1, parts_left)


# ----------------------------------------------------------------------------------------------
# 1. Kernel checks


def _randn(gen: torch.Generator, shape, device, dtype, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
    t = (scale * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


def _attention_inputs(gen, device, dtype, small: bool, cfg: ModelConfig) -> list:
    heads = 12  # not a power of two: ALiBi's second slope series
    batch, seq, head_dim = (2, 33, 16) if small else (2, 256, 64)
    q, k, v = (_randn(gen, (batch, heads, seq, head_dim), device, dtype) for _ in range(3))
    return [q, k, v, alibi_slopes(heads).to(device), 0.0]


def _cross_entropy_inputs(gen, device, dtype, small: bool, cfg: ModelConfig) -> list:
    # The LM head + loss: (hidden, weight, labels, tp_group). Full size: the model's vocabulary and
    # hidden size, rows not a multiple of the fused kernel's token chunk (ragged last chunk).
    rows, vocab, hidden = (37, 300, 16) if small else (100, cfg.padded_vocab_size(), cfg.hidden_size)
    labels = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    return [_randn(gen, (rows, hidden), device, dtype), _randn(gen, (vocab, hidden), device, dtype, scale=0.2),
            labels, None]


def _bias_gelu_inputs(gen, device, dtype, small: bool, cfg: ModelConfig) -> list:
    shape = (5, 7, 64) if small else (2, 128, cfg.ffn_size)
    return [_randn(gen, shape, device, dtype, scale=3.0), _randn(gen, shape[-1:], device, dtype)]


def _bias_dropout_add_inputs(gen, device, dtype, small: bool, cfg: ModelConfig) -> list:
    shape = (4, 6, 32) if small else (2, 128, cfg.hidden_size)
    return [_randn(gen, shape, device, dtype), _randn(gen, shape[-1:], device, dtype),
            _randn(gen, shape, device, dtype), 0.0, True]  # p=0 (BLOOM's), training


def _add_layer_norm_inputs(gen, device, dtype, small: bool, cfg: ModelConfig) -> list:
    shape = (4, 6, 32) if small else (2, 128, cfg.hidden_size)
    return [_randn(gen, shape, device, dtype), _randn(gen, shape[-1:], device, dtype),
            _randn(gen, shape, device, dtype), _randn(gen, shape[-1:], device, dtype, scale=0.5),
            _randn(gen, shape[-1:], device, dtype), cfg.layernorm_epsilon]


# Arguments of one call of each kernel; a kernel missing here is recorded as "no input builder".
INPUT_BUILDERS: dict[str, Callable[..., list]] = {
    "attention": _attention_inputs,
    "cross_entropy": _cross_entropy_inputs,
    "bias_gelu": _bias_gelu_inputs,
    "bias_dropout_add": _bias_dropout_add_inputs,
    "add_layer_norm": _add_layer_norm_inputs,
}


def _run_kernel(fn: Callable, args: list, weights: Optional[torch.Tensor]) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Output and input gradients (by argument position) of ``fn`` on fresh leaf copies of ``args``,
    for the loss ``sum(output * weights)`` (random weights: every gradient element matters)."""
    leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.requires_grad else a
              for a in args]
    out = fn(*leaves)
    if isinstance(out, tuple):  # several outputs (add_layer_norm): compared as one
        out = torch.cat([o.flatten() for o in out])
    if weights is None:
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device)
    (out.float() * weights).sum().backward()
    grads = {f"grad_arg{i}": a.grad for i, a in enumerate(leaves) if isinstance(a, torch.Tensor) and a.requires_grad}
    return out.detach(), grads, weights


def _errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    got, want = got.float(), want.float()
    diff = got - want
    return diff.abs().max().item(), (diff.norm() / want.norm().clamp_min(1e-30)).item()


def check_kernels(cfg: ModelConfig, device: torch.device, small: bool, deadline: float) -> list[dict[str, Any]]:
    """One record per (kernel, implementation, dtype): errors against the reference, pass or fail."""
    records = []
    for kernel, implementations in IMPLEMENTATIONS.items():
        base = {"kernel": kernel}
        if "reference" not in implementations:
            records.append(base | {"status": "skipped", "reason": "no reference implementation"})
            continue
        builder = INPUT_BUILDERS.get(kernel)
        for name, impl in implementations.items():
            if name == "reference":
                continue
            record = base | {"implementation": name}
            if builder is None:
                records.append(record | {"status": "skipped", "reason": "no input builder in bench/gpu_check.py"})
                continue
            for dtype in (torch.float32, torch.bfloat16):
                entry = record | {"dtype": DTYPE_NAMES[dtype], "tolerance": TOLERANCE[dtype]}
                refused = impl.unavailable(device.type, cfg, dtype)
                if refused:
                    records.append(entry | {"status": "skipped", "reason": f"unavailable on {device.type}: {refused}"})
                    continue
                if time.monotonic() > deadline:
                    records.append(entry | {"status": "skipped", "reason": "time budget"})
                    continue
                try:
                    entry |= _compare(implementations["reference"].fn, impl.fn, builder, cfg, device, dtype, small)
                    log(f"kernel {kernel}/{name} {DTYPE_NAMES[dtype]}: {entry['status']}")
                except Exception as exc:  # noqa: BLE001 - a broken kernel is a result, not a crash
                    entry |= {"status": "error", "reason": f"{type(exc).__name__}: {exc}",
                              "traceback": traceback.format_exc(limit=-4)}
                records.append(entry)
    return records


def _compare(reference: Callable, fn: Callable, builder: Callable, cfg: ModelConfig, device: torch.device,
             dtype: torch.dtype, small: bool) -> dict[str, Any]:
    args = builder(torch.Generator().manual_seed(1234), device, dtype, small, cfg)
    ref_out, ref_grads, weights = _run_kernel(reference, args, None)
    _sync(device)
    start = time.perf_counter()
    out, grads, _ = _run_kernel(fn, args, weights)  # the first call: includes any compilation
    _sync(device)
    first_call_s = time.perf_counter() - start
    if out.shape != ref_out.shape or out.dtype != ref_out.dtype:
        return {"status": "fail", "reason": f"output {tuple(out.shape)} {out.dtype}, reference "
                                            f"{tuple(ref_out.shape)} {ref_out.dtype}"}
    max_abs, rel = {}, {}
    for label, got, want in [("out", out, ref_out), *((k, grads[k], ref_grads[k]) for k in ref_grads)]:
        if (got is None) != (want is None):
            return {"status": "fail", "reason": f"{label}: gradient on one side only"}
        if got is not None:
            max_abs[label], rel[label] = _errors(got, want)
    ok = all(math.isfinite(e) and e <= TOLERANCE[dtype] for e in rel.values())
    return {"status": "pass" if ok else "fail", "max_abs_error": max_abs, "rel_error": rel,
            "first_call_s": round(first_call_s, 4)}


# ----------------------------------------------------------------------------------------------
# 2. Training steps


class MasterWeightAdamW:
    """AdamW over fp32 master weights of a lower-precision model (DeepSpeed's bf16 optimizer's
    arrangement): gradients are cast to fp32 into the masters, clipped, stepped, and the new
    weights copied back into the model. With an fp32 model the masters are its parameters."""

    def __init__(self, model: torch.nn.Module, optimizer_cfg, fused: bool, clip_grad: float):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.separate = any(p.dtype != torch.float32 for p in self.params)
        self.masters = [p.detach().float().clone() for p in self.params] if self.separate else self.params
        self.clip_grad = clip_grad
        self.optimizer = torch.optim.AdamW(self.masters, lr=optimizer_cfg.lr,
                                           betas=(optimizer_cfg.adam_beta1, optimizer_cfg.adam_beta2),
                                           eps=optimizer_cfg.adam_eps, weight_decay=optimizer_cfg.weight_decay,
                                           fused=fused)

    def step(self) -> None:
        if self.separate:
            for master, param in zip(self.masters, self.params):
                master.grad = None if param.grad is None else param.grad.float()
                param.grad = None
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.masters, self.clip_grad, foreach=True)
        self.optimizer.step()
        if self.separate:
            with torch.no_grad():
                for master, param in zip(self.masters, self.params):
                    param.copy_(master)

    def zero_grad(self) -> None:
        for t in (*self.params, *self.masters):
            t.grad = None


@dataclasses.dataclass
class Runner:
    """One model ready to train: ``loss(tokens [b, s + 1])``, optimizer and recompute switch."""

    model: torch.nn.Module
    loss: Callable[[torch.Tensor], torch.Tensor]
    set_recompute: Callable[[bool], None]
    optimizer: MasterWeightAdamW
    description: dict[str, Any]


def resolve_kernels(cfg: ModelConfig, device_type: str, spec: str, dtype: torch.dtype) -> Kernels:
    """``auto``, ``reference`` or ``kernel=implementation,...`` (on top of ``auto``), for a run in ``dtype``."""
    if spec == "auto":
        return select_kernels(cfg, device_type, dtype)
    if spec == "reference":
        return select_kernels(dataclasses.replace(cfg, use_fused_kernels=False), device_type, dtype)
    kernels = select_kernels(cfg, device_type, dtype)
    known = {f.name for f in dataclasses.fields(Kernels)}
    for item in spec.split(","):
        kernel, _, name = item.partition("=")
        if kernel not in known or name not in IMPLEMENTATIONS.get(kernel, {}):
            raise ValueError(f"variant {spec!r}: {item!r} is not kernel=implementation; known: "
                             f"{ {k: sorted(v) for k, v in IMPLEMENTATIONS.items()} }")
        refused = IMPLEMENTATIONS[kernel][name].unavailable(device_type, cfg, dtype)
        if refused:
            raise ValueError(f"variant {spec!r}: {kernel}={name} cannot run on {device_type}: {refused}")
        kernels = dataclasses.replace(kernels, **{kernel: KernelChoice(kernel, name, "--variants",
                                                                       IMPLEMENTATIONS[kernel][name].fn)})
    return kernels


def build_ours(cfg, device: torch.device, dtype: torch.dtype, spec: str, fused_adam: bool) -> Runner:
    kernels = resolve_kernels(cfg.model, device.type, spec, dtype)
    model = build_model(cfg.model, cfg.model.padded_vocab_size(), device=device, seed=cfg.training.seed,
                        kernels=kernels).to(dtype)
    model.train()

    def set_recompute(on: bool) -> None:
        # What build_model(..., checkpoint_num_layers=1) stores: toggled here instead of rebuilding.
        model.checkpoint_num_layers = 1 if on else 0

    # The model's own loss path: the registry's LM head + loss (fused_linear forms no logits).
    optimizer = MasterWeightAdamW(model, cfg.optimizer, fused_adam, cfg.optimizer.clip_grad)
    return Runner(model, lambda tokens: model(tokens[:, :-1], labels=tokens[:, 1:]), set_recompute, optimizer,
                  {"kernels": {f.name: {"implementation": getattr(kernels, f.name).name,
                                        "reason": getattr(kernels, f.name).reason}
                               for f in dataclasses.fields(kernels)},
                   "loss": f"model(ids, labels): cross_entropy={kernels.cross_entropy.name}",
                   "parameters": sum(p.numel() for p in model.parameters())})


def build_transformers(cfg, device: torch.device, dtype: torch.dtype, fused_adam: bool) -> Runner:
    from transformers import BloomConfig, BloomForCausalLM

    m = cfg.model
    hf_cfg = BloomConfig(vocab_size=m.padded_vocab_size(), hidden_size=m.hidden_size, n_layer=m.num_layers,
                         n_head=m.num_attention_heads, layer_norm_epsilon=m.layernorm_epsilon,
                         initializer_range=m.init_method_std, hidden_dropout=0.0, attention_dropout=0.0,
                         use_cache=False)
    with torch.device(device):  # initialised on the device: no minute of CPU random draws
        model = BloomForCausalLM(hf_cfg)
    model = model.to(device=device, dtype=dtype)
    model.train()

    def set_recompute(on: bool) -> None:
        # Every layer, non-reentrant torch checkpoint; transformers 5 renamed gradient_checkpointing_*
        # to activation_checkpointing_* (the old names warn there).
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            if on:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.activation_checkpointing_disable()
        elif on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_disable()

    # transformers' recipe for the loss: logits upcast to fp32, then cross entropy (our reference).
    return Runner(model,
                  lambda tokens: language_model_loss(model(input_ids=tokens[:, :-1]).logits, tokens[:, 1:],
                                                     fused=False), set_recompute,
                  MasterWeightAdamW(model, cfg.optimizer, fused_adam, cfg.optimizer.clip_grad),
                  {"transformers": __import__("transformers").__version__,
                   "parameters": sum(p.numel() for p in model.parameters()),
                   "loss": "language_model_loss(fused=False): logits upcast to fp32, as transformers does"})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train_step(runner: Runner, tokens: torch.Tensor) -> torch.Tensor:
    """Forward, loss, backward and optimizer step on ``tokens`` [b, s + 1]; the detached loss."""
    loss = runner.loss(tokens)
    loss.backward()
    runner.optimizer.step()
    runner.optimizer.zero_grad()
    return loss.detach()


def _sig(x: float, digits: int = 5) -> float:
    return float(f"{x:.{digits}g}")


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError)


def timed_step(runner: Runner, tokens: torch.Tensor, device: torch.device) -> tuple[Optional[float], float]:
    """(seconds, loss) of one synchronised step, or (None, nan) when the device ran out of memory."""
    _sync(device)
    start = time.perf_counter()
    try:
        loss = train_step(runner, tokens)
        _sync(device)
        seconds, value = time.perf_counter() - start, loss.float().item()
    except Exception as exc:
        if not _is_oom(exc):
            raise
        seconds, value = None, float("nan")
    if seconds is None:  # outside the handler: the failed step's frames (and tensors) are gone
        runner.optimizer.zero_grad()
        _free(device)
    return seconds, value


def measure(runner: Runner, cfg, device: torch.device, args, peak: Optional[float], deadline: float,
            recompute: bool) -> dict[str, Any]:
    """Micro-batch search, warm-up and timed steps of one variant; the record for the results."""
    seq, vocab = cfg.model.seq_length, cfg.model.vocab_size
    gen = torch.Generator().manual_seed(cfg.training.seed)

    def batch(mb: int) -> torch.Tensor:
        return torch.randint(0, vocab, (mb, seq + 1), generator=gen).to(device)

    record: dict[str, Any] = {"recompute": recompute, "micro_batch_search": []}
    if time.monotonic() >= deadline:
        return record | {"status": "skipped: time budget", "reason": "no time left for this variant"}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # The search: one step per size; the first size gets a second step, since its first one also
    # pays for compilation and the device's start-up, which must not enter the time estimates.
    candidates = [args.micro_batch] if args.micro_batch else \
        [2**i for i in range(int(math.log2(args.max_micro_batch)) + 1)]
    fits, last_s = None, None
    for mb in candidates:
        # Try a size only if, when it fits, its warm-up and timed steps would still fit the share.
        if fits and time.monotonic() + last_s * mb / fits * (1 + args.warmup + args.steps) > deadline:
            record["micro_batch_search_stopped"] = f"time budget (next size: {mb})"
            break
        tokens = batch(mb)
        seconds, loss = timed_step(runner, tokens, device)
        entry = {"micro_batch": mb, "fits": seconds is not None, "loss": None if seconds is None else loss}
        if seconds is not None and fits is None:
            entry["first_step_seconds"] = round(seconds, 4)
            seconds, _ = timed_step(runner, tokens, device)
        entry["fits"], entry["seconds"] = seconds is not None, None if seconds is None else round(seconds, 4)
        record["micro_batch_search"].append(entry)
        log(f"  micro-batch {mb}: " + ("out of memory" if seconds is None else f"{seconds:.2f} s, loss {loss:.4f}"))
        if seconds is None:
            break
        fits, last_s = mb, seconds
    if fits is None:
        return record | {"status": "error", "reason": f"out of memory at micro-batch {candidates[0]}"}
    # Warm-up and timed steps at the chosen size, as many as the time left allows; halve on OOM.
    mb = fits
    while mb >= 1:
        est = last_s * mb / fits
        steps = min(args.steps, int((deadline - time.monotonic()) / max(est, 1e-6)) - args.warmup)
        if steps < 1:
            return record | {"micro_batch": mb, "status": "skipped: time budget",
                             "reason": f"a step takes ~{est:.2f} s and {deadline - time.monotonic():.1f} s are left"}
        tokens = batch(mb)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, losses = [], []
        for i in range(args.warmup + steps):
            seconds, loss = timed_step(runner, tokens, device)
            if seconds is None:
                break
            losses.append(loss)
            if i >= args.warmup:
                times.append(seconds)
        else:
            break
        record.setdefault("out_of_memory_while_timing", []).append(mb)
        mb //= 2
    else:
        return record | {"status": "error", "reason": "out of memory while timing"}
    median = statistics.median(times)
    log(f"  micro-batch {mb}: {1000 * median:.1f} ms/step (median of {len(times)})")
    rates = throughput(cfg.model, cfg.model.padded_vocab_size(), mb, median, 1, recompute, peak)
    record |= {
        "status": "ok", "micro_batch": mb, "steps_timed": len(times), "warmup_steps": args.warmup,
        "ms_per_step": round(1000 * median, 3), "step_ms": [round(1000 * t, 3) for t in times],
        "tokens_per_s": _sig(rates["tokens-per-second"]),
        "model_tflops": _sig(rates["tflops-per-device"]),
        "hardware_tflops": _sig(rates["hardware-tflops-per-device"]),
        "mfu": _sig(rates["mfu"]) if "mfu" in rates else None,
        "loss_first": losses[0], "loss_last": losses[-1],
    }
    if device.type == "cuda":
        record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        record["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
    else:
        record["peak_memory_gib"] = None  # CUDA's allocator statistics only
    return record


# ----------------------------------------------------------------------------------------------
# Machine, table, main


def device_peak(device: torch.device, override_tflops: Optional[float]) -> tuple[Optional[float], str]:
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "no MFU on CPU"
    name = torch.cuda.get_device_name(device)
    for piece, peak in PEAK_BF16:
        if piece in name:
            return peak, f"dense bf16 peak of {piece} (table in bench/gpu_check.py)"
    return None, f"unknown device {name!r}: pass --peak-tflops for MFU"


def describe_device(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"type": "cpu", "threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 2), "multiprocessors": props.multi_processor_count,
            "cuda": torch.version.cuda, "triton": triton_version,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}


def print_tables(result: dict[str, Any]) -> None:
    checks = result.get("kernel_checks", [])
    if checks:
        print("\nkernel checks (norm-relative error against the reference; worst of output and gradients):")
        for c in checks:
            worst = f"{max(c['rel_error'].values()):.2e} (tol {c['tolerance']:.0e})" if c.get("rel_error") else ""
            note = "" if c["status"] == "pass" else "  " + str(c.get("reason", ""))
            print(f"  {c['kernel']:<17} {c.get('implementation', '-'):<12} {c.get('dtype', '-'):<5} "
                  f"{c['status']:<8} {worst}{note}")
    rows = result.get("training", [])
    if rows:
        print(f"\ntraining steps: {result['config']['shape']}, {result['config']['dtype']}")
        header = ("variant", "recompute", "micro-batch", "ms/step", "tokens/s", "model TFLOP/s", "hw TFLOP/s",
                  "MFU", "peak GiB", "status")
        print("  " + " | ".join(header))

        def fmt(value, spec):
            if value is None:
                return "-"
            return format(value, ".3g") if spec == ".1f" and abs(value) < 1 else format(value, spec)

        for r in rows:
            print("  " + " | ".join([r["variant"], "yes" if r["recompute"] else "no", fmt(r.get("micro_batch"), "d"),
                                     fmt(r.get("ms_per_step"), ",.1f"), fmt(r.get("tokens_per_s"), ",.0f"),
                                     fmt(r.get("model_tflops"), ".1f"), fmt(r.get("hardware_tflops"), ".1f"),
                                     fmt(r.get("mfu"), ".1%"), fmt(r.get("peak_memory_gib"), ".1f"),
                                     r.get("status", "?")]))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="CPU, tiny shape (2 layers, hidden 64, 4 heads, vocab 512, seq 32), 1 timed step")
    parser.add_argument("--config", type=Path, default=ROOT / "configs/bloom-1b7.yaml",
                        help="model shape and optimizer settings (default: configs/bloom-1b7.yaml)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: the config's, 2048)")
    parser.add_argument("--variants", nargs="+", default=["auto", "reference"],
                        help="kernel choices: auto, reference, or kernel=implementation[,...] on top of auto")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers' BloomForCausalLM")
    parser.add_argument("--no-recompute", action="store_true", help="only the variants without recompute")
    parser.add_argument("--micro-batch", type=int, default=None, help="fix the micro-batch (no search)")
    parser.add_argument("--max-micro-batch", type=int, default=None, help="largest micro-batch tried (GPU: 64)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (GPU: 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before them (GPU: 2)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                        help="model precision (fp32 masters and AdamW state either way)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU, TFLOP/s")
    parser.add_argument("--time-budget", type=float, default=420.0,
                        help="seconds from process start; later phases are skipped past it (default 420)")
    parser.add_argument("--skip-kernel-checks", action="store_true")
    parser.add_argument("--output", type=Path, default=None,
                        help="results JSON (default bench/results/gpu_check.json, --cpu-smoke: "
                             "bench/results/gpu_check_cpu_smoke.json)")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    args.max_micro_batch = args.max_micro_batch or (2 if smoke else 64)
    args.steps = args.steps or (1 if smoke else 5)
    args.warmup = (0 if smoke else 2) if args.warmup is None else args.warmup  # smoke: the search warmed up
    args.output = args.output or ROOT / ("bench/results/gpu_check_cpu_smoke.json" if smoke
                                         else "bench/results/gpu_check.json")
    return args


def main(argv=None) -> int:
    """Run the checks and the steps; write the results; 0 when every kernel check passed and
    every variant measured or was skipped for time, 1 otherwise."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    clock = Clock(args.time_budget)
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", 0)
    else:
        print("gpu_check: no CUDA device; on a machine without one run `python bench/gpu_check.py --cpu-smoke`",
              file=sys.stderr)
        return 2
    cfg = load_config(args.config)
    if args.cpu_smoke:
        cfg.model = ModelConfig(**SMOKE_MODEL)
    if args.seq:
        cfg.model.seq_length = args.seq
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    peak, peak_source = device_peak(device, args.peak_tflops)
    m = cfg.model
    result: dict[str, Any] = {
        "command": shlex.join(["python", "bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "mode": "cpu_smoke" if args.cpu_smoke else "gpu",
        "complete": False,
        "machine": describe_machine(),
        "device": describe_device(device),
        "config": {
            "source": str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT) else str(args.config),
            "shape": f"{m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads, vocabulary "
                     f"{m.padded_vocab_size()}, sequence {m.seq_length}",
            "model": dataclasses.asdict(m),
            "dtype": f"{args.dtype} weights, activations and gradients; fp32 master weights and AdamW state"
            if dtype == torch.bfloat16 else "fp32",
            "optimizer": f"torch.optim.AdamW(fused=True) over fp32 masters, lr {cfg.optimizer.lr}, clip "
                         f"{cfg.optimizer.clip_grad}",
            "steps": args.steps, "warmup": args.warmup, "max_micro_batch": args.max_micro_batch,
            "micro_batch": args.micro_batch, "variants": args.variants,
            "peak_flops": peak, "peak_source": peak_source, "time_budget_s": args.time_budget,
        },
        "phases_s": {"imports": round(IMPORTS_S, 2)},
    }

    def save(final: bool = False) -> None:
        result["elapsed_s"] = round(clock.elapsed(), 2)
        if final:
            write_result(args.output, result)
        else:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.output, json.dumps(result, indent=1) + "\n")

    try:
        torch.manual_seed(cfg.training.seed)
        log(f"{result['device'].get('name', 'cpu')}; {result['config']['shape']}; budget {args.time_budget:.0f} s")
        if not args.skip_kernel_checks:
            start = time.monotonic()
            # Up to a quarter of what is left: cold Triton compiles of the fused kernels dominate.
            result["kernel_checks"] = check_kernels(m, device, args.cpu_smoke,
                                                    time.monotonic() + 0.25 * clock.left())
            result["kernel_checks_passed"] = all(c["status"] in ("pass", "skipped")
                                                 for c in result["kernel_checks"])
            result["phases_s"]["kernel_checks"] = round(time.monotonic() - start, 2)
            _free(device)
            save()
        run_training(args, cfg, device, dtype, peak, clock, result, save)
        result["first_step_loss"] = first_step_losses(result["training"])
        result["complete"] = True
    except Stopped as exc:
        result["stopped"] = str(exc)
    finally:
        save(final=True)
        print_tables(result)
        print(f"\ntotal {clock.elapsed():.1f} s (budget {args.time_budget:.0f} s)")
    bad_checks = not result.get("kernel_checks_passed", True)
    bad_rows = any(r.get("status") not in ("ok", "skipped: time budget", "skipped: not importable")
                   for r in result.get("training", []))
    return 1 if bad_checks or bad_rows or not result["complete"] else 0


def first_step_losses(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The loss of each of our models' first step (same weights, same batch whatever the kernels)
    and its difference from the reference's: the fused kernels, end to end."""
    losses = {r["variant"]: r["micro_batch_search"][0]["loss"] for r in rows
              if r["model"] == "ours" and not r["recompute"] and r.get("micro_batch_search")
              and r["micro_batch_search"][0]["loss"] is not None}
    out: dict[str, Any] = {"loss": losses}
    if "reference" in losses:
        out["difference_from_reference"] = {k: abs(v - losses["reference"]) for k, v in losses.items()
                                            if k != "reference"}
    return out


def run_training(args, cfg, device: torch.device, dtype: torch.dtype, peak: Optional[float], clock: Clock,
                 result: dict[str, Any], save: Callable[[], None]) -> None:
    """Every (model, recompute) variant in turn; one model built per kernel choice."""
    models: list[tuple[str, Callable[[], Runner]]] = [
        (spec, lambda spec=spec: build_ours(cfg, device, dtype, spec, fused_adam=True)) for spec in args.variants]
    if not args.no_transformers:
        models.append(("transformers", lambda: build_transformers(cfg, device, dtype, fused_adam=True)))
    recomputes = (False,) if args.no_recompute else (False, True)
    rows = result["training"] = []
    left = len(models) * len(recomputes)
    for label, build in models:
        base = {"variant": label, "model": "transformers" if label == "transformers" else "ours"}
        deadline = clock.share(left)
        start = time.monotonic()
        runner, error = None, None
        if clock.left() <= 0:
            error = {"status": "skipped: time budget"}
        else:
            log(f"building {label}")
            try:
                runner = build()
            except ImportError as exc:
                error = {"status": "skipped: not importable", "reason": f"{type(exc).__name__}: {exc}"}
            except Exception as exc:  # noqa: BLE001 - recorded, the other variants still run
                error = {"status": "error", "reason": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc(limit=-4)}
        build_s = round(time.monotonic() - start, 2)
        for recompute in recomputes:
            row = base | {"recompute": recompute}
            if runner is None:
                rows.append(row | error)
            else:
                row |= runner.description | {"build_s": build_s}
                log(f"{label}, recompute {'on' if recompute else 'off'}")
                try:
                    runner.set_recompute(recompute)
                    start = time.monotonic()
                    row |= measure(runner, cfg, device, args, peak, deadline, recompute)
                    row["seconds"] = round(time.monotonic() - start, 2)
                except Stopped:
                    rows.append(row | {"status": "stopped"})
                    raise
                except Exception as exc:  # noqa: BLE001
                    row |= {"status": "error", "reason": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc(limit=-4)}
                rows.append(row)
            left -= 1
            deadline = clock.share(left)
            save()
        del runner
        _free(device)


if __name__ == "__main__":
    sys.exit(main())
