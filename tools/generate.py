#!/usr/bin/env python3
"""Continue prompts with any checkpoint: greedy, or sampled with temperature, top-k and top-p.

    python tools/generate.py --checkpoint runs/tiny/checkpoints --prompt "Tous les êtres humains naissent"
    python tools/generate.py --checkpoint exports/tiny-hf --prompts-file prompts.txt \\
        --top-p 0.9 --temperature 0.8 --seed 7 --max-new-tokens 64 --output samples.json

``--checkpoint`` is one of our save roots or ``global_stepN`` folders (any layout), a folder of
bare layer files, or a transformers BLOOM folder. Prompts come from ``--prompt`` (repeatable),
``--prompts-file`` (one prompt per line; blank lines skipped), or else the run config's
``logging.sample_prompts``. Decoding is greedy unless ``--temperature``, ``--top-k`` or
``--top-p`` is given, which samples (seeded by ``--seed``, so a run repeats exactly). Generation
stops after ``--max-new-tokens`` tokens or the end-of-document token.

Tensor parallelism: ``torchrun --nproc-per-node 2 tools/generate.py --tensor-model-parallel-size 2 ...``
splits the model over 2 ranks (re-split from whatever layout saved it); rank 0 prints.

Exit status: 0 on success, 1 when the checkpoint, config, tokenizer or prompts cannot be used
(the message says what to fix), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

try:
    from megatron.utils.terminal import show_progress
except ImportError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from megatron.utils.terminal import show_progress
from megatron.errors import UsageError, process_rank, reports_errors  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="save root, global_stepN folder, layer-file folder or transformers BLOOM folder")
    parser.add_argument("--step", type=int, default=None, help="use global_step{STEP} (default: 'latest')")
    parser.add_argument("--config", default=None,
                        help="the run's YAML config (default: the one found with the checkpoint)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="tokens to generate per prompt (default: the config's logging.sample_tokens)")
    parser.add_argument("--greedy", action="store_true", help="always the most likely token (the default)")
    parser.add_argument("--temperature", type=float, default=None, help="sample, dividing the logits by this")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens")
    parser.add_argument("--top-p", type=float, default=None,
                        help="sample among the most likely tokens whose probabilities sum to P (nucleus)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the sampling generator (default 1234)")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1,
                        help="TP size; launch that many processes with torchrun (default 1)")
    parser.add_argument("--output", default=None, help="also write the prompts and continuations as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (none either off a terminal)")
    args = parser.parse_args(argv)
    sampled = [f for f in ("temperature", "top_k", "top_p") if getattr(args, f) is not None]
    if args.greedy and sampled:
        parser.error(f"--greedy and --{sampled[0].replace('_', '-')} contradict each other: drop one")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    if args.tensor_model_parallel_size < 1:
        parser.error("--tensor-model-parallel-size must be at least 1")
    return args


def sampling_from_args(args: argparse.Namespace):
    """The SamplingConfig the flags ask for (greedy unless a sampling flag is given)."""
    from megatron.inference.generation import SamplingConfig

    greedy = args.temperature is None and args.top_k is None and args.top_p is None
    return SamplingConfig(greedy=greedy, temperature=args.temperature or 1.0, top_k=args.top_k or 0,
                          top_p=args.top_p if args.top_p is not None else 1.0, seed=args.seed).validate()


def read_prompts(args: argparse.Namespace, config_prompts: list[str]) -> list[str]:
    """Prompts from --prompt, then --prompts-file; else the config's logging.sample_prompts."""
    prompts = list(args.prompt)
    if args.prompts_file:
        text = Path(args.prompts_file).read_text(encoding="utf-8")
        prompts += [line for line in text.splitlines() if line.strip()]
    prompts = prompts or list(config_prompts)
    if not prompts:
        raise UsageError("no prompt: pass --prompt TEXT or --prompts-file FILE (the checkpoint's config has no "
                         "logging.sample_prompts)")
    return prompts


def run(args: argparse.Namespace) -> list[dict]:
    """Load the checkpoint, continue every prompt, print on rank 0; returns the records."""
    from tqdm import tqdm

    from megatron.core.distributed import shutdown_distributed
    from megatron.data.tokenizer import load_tokenizer
    from megatron.inference.generation import generate
    from megatron.inference.loading import inference_device, inference_parallel_state, load_for_inference

    sampling = sampling_from_args(args)
    parallel, distributed = inference_parallel_state(args.tensor_model_parallel_size)
    try:
        rank0 = parallel.rank == 0
        device = inference_device()
        loaded = load_for_inference(args.checkpoint, parallel, config=args.config, step=args.step, device=device,
                                    progress=rank0 and show_progress(args.quiet))
        tokenizer_path = args.tokenizer or loaded.tokenizer
        if not tokenizer_path:
            raise UsageError(f"no tokenizer found with {args.checkpoint}: pass --tokenizer tokenizer.json")
        tokenizer = load_tokenizer(tokenizer_path)
        prompts = read_prompts(args, loaded.cfg.logging.sample_prompts)
        max_new = args.max_new_tokens or loaded.cfg.logging.sample_tokens
        mode = "greedy" if sampling.greedy else (
            f"sampled (temperature {sampling.temperature}, top-k {sampling.top_k or 'off'}, top-p {sampling.top_p}, "
            f"seed {sampling.seed})")
        if rank0:
            print(f"{loaded.checkpoint_dir} ({loaded.source}), TP={parallel.tp_size}: {mode}, "
                  f"up to {max_new} new tokens", flush=True)
        records = []
        for prompt in tqdm(prompts, desc="generate", unit="prompt", disable=not (rank0 and show_progress(args.quiet))):
            ids = tokenizer.encode(prompt)
            new = generate(loaded.model, ids, max_new, sampling, eos_id=tokenizer.eod_id, device=device)
            text = tokenizer.decode(new)
            records.append({"prompt": prompt, "prompt_ids": ids, "new_ids": new, "continuation": text})
            if rank0:
                print(f"  {prompt!r} -> {text!r}", flush=True)
        return records
    finally:
        if distributed:
            shutdown_distributed()


@reports_errors("generate")
def main(argv: Sequence[str] | None = None) -> int:
    """Run the generation; returns the exit status. Expected errors (a missing checkpoint, bad data or options) end
    it with one message from rank 0 and a non-zero status."""
    args = parse_args(argv)
    records = run(args)
    if args.output and process_rank() == 0:
        from megatron.utils.atomic import atomic_write_text

        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.output), json.dumps(records, indent=1, ensure_ascii=False) + "\n")
        print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
