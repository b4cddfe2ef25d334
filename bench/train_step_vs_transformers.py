#!/usr/bin/env python
"""One training step of our BLOOM against transformers' BloomForCausalLM, same process, same data.

    python bench/train_step_vs_transformers.py            # the issue's config, bf16 autocast on CPU
    python bench/train_step_vs_transformers.py --steps 10 --compile

Both models get the same weights and the same batches; each step is forward under bf16
autocast, fp32 cross entropy (ours: the fused kernel; transformers: its own recipe, logits
upcast to fp32 then ``F.cross_entropy``), backward, torch AdamW step, zero_grad. Runs alternate between the
two models (A B A B ...) so drifts in machine load hit both alike; the median per model is
reported. Results go to bench/results/train_step_vs_transformers.json with the command, the
machine and the library versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron.config import ModelConfig  # noqa: E402
from megatron.convert.hf_mapping import ours_to_hf_state_dict  # noqa: E402
from megatron.model.bloom import build_model, language_model_loss  # noqa: E402


def make_step(forward, optimizer, autocast: bool, fused_loss: bool):
    """A closure running one full training step on a batch."""

    def step(tokens: torch.Tensor) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = forward(tokens[:, :-1])
        loss = language_model_loss(logits, tokens[:, 1:], fused=fused_loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None) -> int:
    """Measure and print ms/step for both models and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="measured steps per model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile our model (inductor)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench/results/train_step_vs_transformers.json")
    args = parser.parse_args(argv)

    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                      vocab_size=args.vocab, seq_length=args.seq, init_method_std=0.02)
    ours = build_model(cfg)
    hf = BloomForCausalLM(BloomConfig(vocab_size=cfg.padded_vocab_size(), hidden_size=args.hidden,
                                      n_layer=args.layers, n_head=args.heads, hidden_dropout=0.0,
                                      attention_dropout=0.0))
    hf.load_state_dict(ours_to_hf_state_dict(ours.state_dict()))
    ours.train()
    hf.train()
    autocast = not args.fp32
    forward_ours = torch.compile(ours) if args.compile else ours
    # Same optimizer for both: torch AdamW with its default (foreach) implementation.
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4)
    steps = {
        "ours": make_step(forward_ours, opt_ours, autocast, fused_loss=True),
        # transformers' own loss: logits upcast to fp32, then cross entropy (the reference kernel).
        "transformers": make_step(lambda x: hf(x).logits, opt_hf, autocast, fused_loss=False),
    }
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq + 1)) for _ in range(args.warmup + args.steps)]
    times = {name: [] for name in steps}
    losses = {name: [] for name in steps}
    for i, batch in enumerate(batches):
        for name, step in steps.items():
            start = time.perf_counter()
            losses[name].append(step(batch))
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    ratio = ms["transformers"] / ms["ours"]
    print(f"config: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}, "
          f"seq {args.seq}, batch {args.batch}, {'fp32' if args.fp32 else 'bf16 autocast'}"
          f"{', torch.compile' if args.compile else ''}")
    for name in steps:
        print(f"{name:>13}: {ms[name]:8.1f} ms/step (median of {args.steps}; all: "
              f"{', '.join(f'{1000 * t:.0f}' for t in times[name])})")
    print(f"speed-up of ours over transformers: {ratio:.2f}x")
    print(f"first-step losses: ours {losses['ours'][0]:.6f}, transformers {losses['transformers'][0]:.6f}")
    result = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT),
                                         *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "python": platform.python_version()},
        "config": vars(args) | {"output": str(args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT)
                                              else args.output)},
        "ms_per_step": ms,
        "all_step_seconds": times,
        "speedup": ratio,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
