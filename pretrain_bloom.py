#!/usr/bin/env python
"""Pretrain a BLOOM model: ``python pretrain_bloom.py --config configs/bloom-560m.yaml``.

Every run setting lives in the YAML config; ``--set section.field=value`` overrides any of
them (repeatable). ``--dry-run`` builds the model on the meta device, prints its parameter
counts and the parallel layout, and exits without allocating memory or starting processes.
``--eval-only`` loads the checkpoint, evaluates the run's validation sets (the blend and every
language), logs them and exits (tools/evaluate.py does the same on any held-out data).
Launch several processes with ``torchrun`` or the ``deepspeed`` launcher.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from megatron.config import Config, load_config
from megatron.errors import reports_errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line: a config file, overrides, and the dry-run switch."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config field, e.g. --set model.num_layers=4 (repeatable)")
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate the loaded checkpoint on the run's validation sets and exit, without "
                             "training or saving (the same as --set training.eval_only=true)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the model on the meta device, print sizes and layout, exit")
    # The deepspeed launcher passes --local_rank; torchrun sets LOCAL_RANK instead. Both work.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--world-size", type=int, default=None,
                        help="number of ranks to plan for in --dry-run (default: $WORLD_SIZE or TP x PP)")
    parser.add_argument("--gpu", default="a100-80gb",
                        help="with --dry-run: the device profile to plan memory and time for (see tools/plan.py; "
                             "'cpu' for this machine's live tensor bytes)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="with --dry-run: devices per node")
    parser.add_argument("--check-data", action="store_true",
                        help="with --dry-run: also check that every dataset prefix and the tokenizer exist and "
                             "agree, and fail (exit 2) listing every problem")
    return parser.parse_args(argv)


def dry_run(cfg: Config, world_size: int, gpu: str = "a100-80gb", gpus_per_node: int = 8) -> None:
    """Print parameter counts and the layout without allocating any tensor memory."""
    from megatron.model.bloom import build_model, count_parameters

    cfg.validate(world_size)
    m, p = cfg.model, cfg.parallel
    counts = count_parameters(build_model(m, cfg.padded_vocab_size, device="meta"))
    # The pipeline's layer indices: embedding 1, blocks 3..L+2, final LayerNorm L+4, tied head L+5.
    dp = cfg.data_parallel_size(world_size)
    print(f"model: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads, "
          f"seq {m.seq_length}, vocab {m.vocab_size:,} padded to {cfg.padded_vocab_size:,}")
    print(f"parameters: {counts['total']:,}")
    print(f"  embedding: {counts['embedding']:,}")
    print(f"  non-embedding: {counts['non_embedding']:,}")
    print(f"layout: TP{p.tensor_model_parallel_size} PP{p.pipeline_model_parallel_size} DP{dp} "
          f"over {world_size} ranks, ZeRO stage {p.zero_stage}")
    # The planner's prediction (tools/plan.py has every option): memory per GPU and throughput.
    from megatron.planning import hardware
    from megatron.planning.plan import format_plan, make_plan

    per_node = min(gpus_per_node, world_size)
    nodes = max(world_size // per_node, 1)
    device = hardware.device(gpu)
    network = hardware.DEFAULT_NETWORK[device.name]
    cluster = hardware.Cluster(device, nodes, per_node, hardware.NETWORKS[network],
                               network_efficiency=hardware.NETWORK_EFFICIENCIES[network])
    t = cfg.training
    precision = "bf16" if t.bf16 else "fp16" if t.fp16 else "fp32"
    print(f"plan ({precision}; formulas in megatron/training/memory.py and megatron/planning/, "
          f"constants with sources in megatron/planning/hardware.py):")
    print(format_plan(make_plan(cfg, cluster)))


def check_data_before_launch(cfg: Config, asked: bool) -> int:
    """The dry run's data line: checked (exit 2 on any problem, all listed) or said to be skipped."""
    n = len(cfg.data.datasets)
    if not asked:
        print(f"data: not checked ({n} dataset prefixes and the tokenizer; add --check-data to verify them)")
        return 0
    from megatron.data.check import check_data, format_problems

    problems = check_data(cfg.data)
    if problems:
        print(format_problems(problems), file=sys.stderr)
        return 2
    print(f"data: {n} dataset prefixes and the tokenizer checked, they exist and agree")
    return 0


def _record(fn):
    """torchrun's error recording: a failing rank's traceback lands in $TORCHELASTIC_ERROR_FILE."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(fn)


@_record
@reports_errors()
def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code. Expected errors (a bad config, data or
    checkpoint; a diverged run) end it with one message from rank 0 and a non-zero status."""
    args = parse_args(argv)
    # A warning is a message for the user: print it, not the source line that raised it.
    warnings.formatwarning = lambda message, category, *_args, **_kwargs: f"warning: {message}\n"
    overrides = args.overrides + (["training.eval_only=true"] if args.eval_only else [])
    cfg = load_config(args.config, overrides)
    if args.dry_run:
        p = cfg.parallel
        world_size = args.world_size or int(os.environ.get("WORLD_SIZE", 0)) or (
            p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
        dry_run(cfg, world_size, args.gpu, args.gpus_per_node)
        return check_data_before_launch(cfg, args.check_data)
    from megatron.training.pretrain import pretrain

    pretrain(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
