#!/usr/bin/env python
"""Predict memory per GPU and time per iteration of a run's layout, before launching it.

    python tools/plan.py --config configs/bloom-176b.yaml --gpu a100-80gb --nodes 48 --gpus-per-node 8
    python tools/plan.py --config configs/bloom-176b.yaml --gpu a100-80gb --nodes 48 --gpus-per-node 8 \\
        --network omnipath-4x100 --kernels megatron-deepspeed --json plan.json
    python tools/plan.py --config configs/bloom-176b.yaml --gpu a100-80gb --nodes 48 --gpus-per-node 8 --search

Prints, for every pipeline stage, the memory of one GPU by part (weights, fp32 and bf16
gradients, optimizer state under the ZeRO stage, activations of the in-flight micro-batches,
recompute working set, logits, attention scores, communication buffers, CUDA context + NCCL,
allocator fragmentation), the time per iteration by part (GEMMs at a shape-dependent
efficiency, attention, elementwise kernels, TP communication, pipeline p2p and bubble, DP
gradient reduction, optimizer step), TFLOP/s per GPU (hardware with recompute counted, as
BLOOM logged it, and model), MFU, tokens/s and days for --tokens tokens.

``--search`` ranks every layout (TP, PP, DP, micro-batch, recompute, ZeRO stage, sequence
parallelism) that fits the devices with ``--headroom`` to spare, fastest first, and says where
the config's own layout ranks and why the first is predicted faster.

Every device, network and efficiency constant, with its source, is in
megatron/planning/hardware.py; the memory formulas in megatron/training/memory.py; the time
model in megatron/planning/timing.py. Exit status: 0, or 2 for a bad config or option (the
message names it), or 1 with --require-fit when the layout does not fit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron.config import ConfigError, load_config
from megatron.planning import hardware as hw
from megatron.training.memory import MEGATRON_DEEPSPEED_2022, MEGATRON_LM_GPT, Kernels

KERNEL_SETS = {"auto": None, "megatron-deepspeed": MEGATRON_DEEPSPEED_2022, "megatron-lm": MEGATRON_LM_GPT}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the planner."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config field (repeatable)")
    parser.add_argument("--gpu", default="a100-80gb", help=f"device profile: {', '.join(sorted(hw.DEVICES))}")
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="devices per node")
    parser.add_argument("--network", default=None,
                        help=f"inter-node network: {', '.join(sorted(hw.NETWORKS))} (default: the GPU's usual one)")
    parser.add_argument("--inter-node-gbps", type=float, default=None,
                        help="inter-node wire rate per node in Gb/s, all NICs together (overrides --network; NCCL is "
                             "taken to reach 90%% of it)")
    parser.add_argument("--intra-node-gbs", type=float, default=None,
                        help="NCCL bus bandwidth inside a node in GB/s (default: the GPU's NVLink figure)")
    parser.add_argument("--kernels", choices=sorted(KERNEL_SETS), default="auto",
                        help="attention/LM-head kernels: ours as megatron/model/kernels picks them on the device "
                             "(auto), or Megatron-DeepSpeed's 2022 ones (materialised attention scores and full "
                             "logits), which BLOOM-176B ran, or Megatron-LM's for its GPT runs (the same, without "
                             "ALiBi and without the mask sent between stages)")
    parser.add_argument("--tokens", type=float, default=None, help="also print days to train this many tokens")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the plan as JSON ('-' for stdout)")
    parser.add_argument("--search", action="store_true", help="rank the layouts that fit, fastest first")
    parser.add_argument("--headroom", type=float, default=0.0,
                        help="with --search: fraction of device memory to keep free (e.g. 0.05)")
    parser.add_argument("--no-sequence-parallel", action="store_true",
                        help="with --search: leave sequence parallelism out (e.g. to compare with Megatron-DeepSpeed "
                             "2022, which BLOOM-176B ran and which had none)")
    parser.add_argument("--top", type=int, default=10, help="with --search: how many layouts to print")
    parser.add_argument("--require-fit", action="store_true", help="exit 1 when the layout does not fit")
    return parser.parse_args(argv)


def build_cluster(args: argparse.Namespace) -> hw.Cluster:
    """The cluster described by the options."""
    device = hw.device(args.gpu)
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ValueError("--nodes and --gpus-per-node must be at least 1")
    efficiency = hw.NETWORK_EFFICIENCY
    if args.inter_node_gbps is not None:
        inter = args.inter_node_gbps * 1e9 / 8
    else:
        network = args.network or hw.DEFAULT_NETWORK[device.name]
        if network not in hw.NETWORKS:
            raise ValueError(f"--network {network!r} is unknown: choose one of {sorted(hw.NETWORKS)} or give "
                             "--inter-node-gbps")
        inter, efficiency = hw.NETWORKS[network], hw.NETWORK_EFFICIENCIES[network]
    if args.nodes > 1 and inter <= 0:
        raise ValueError(f"{args.nodes} nodes need an inter-node network: give --network or --inter-node-gbps")
    intra = args.intra_node_gbs * 1e9 if args.intra_node_gbs else None
    return hw.Cluster(device, args.nodes, args.gpus_per_node, inter, intra, efficiency)


def search_report(cfg, cluster: hw.Cluster, kernels: Kernels | None, headroom: float, top: int,
                  sequence_parallel=(False, True)) -> tuple[str, list]:
    """The ranking as text, with where the config's own layout lands and why the first wins."""
    from megatron.planning.plan import make_plan, search

    plans = search(cfg, cluster, headroom, kernels, sequence_parallel=sequence_parallel)
    own = make_plan(cfg, cluster, kernels)
    lines = [f"{len(plans)} layouts fit {cluster.nodes} x {cluster.gpus_per_node} {cluster.device.name} with "
             f"{100 * headroom:.0f}% headroom; fastest first:",
             f"{'rank':>4} {'TP':>3} {'PP':>3} {'DP':>4} {'mbs':>4} {'recomp':>6} {'ZeRO':>4} {'SP':>3} "
             f"{'GiB/GPU':>8} {'s/iter':>8} {'TFLOP/s hw':>10} {'MFU %':>6}"]
    own_rank = None
    for rank, plan in enumerate(plans, 1):
        lay = plan.layout()
        if (lay == own.layout()) and own_rank is None:
            own_rank = rank
        if rank <= top or rank == own_rank:
            met = plan.metrics()
            lines.append(f"{rank:>4} {lay['tp']:>3} {lay['pp']:>3} {lay['dp']:>4} {lay['micro_batch_size']:>4} "
                         f"{'yes' if lay['recompute'] else 'no':>6} {lay['zero_stage']:>4} "
                         f"{'yes' if lay['sequence_parallel'] else 'no':>3} {plan.memory_bytes / 2**30:>8.1f} "
                         f"{plan.time.total:>8.2f} {met['tflops_per_gpu_hardware']:>10.1f} {100 * met['mfu']:>6.1f}"
                         + ("   <- the config's layout" if rank == own_rank else ""))
    if own_rank is None:
        lines.append(f"the config's own layout does not fit with this headroom ({own.memory_bytes / 2**30:.1f} GiB "
                     f"per GPU predicted)")
    elif own_rank > 1 and plans:
        best = plans[0]
        lines.append(f"the config's layout ranks {own_rank} of {len(plans)}; the first is predicted "
                     f"{own.time.total / best.time.total:.2f}x faster because:")
        for part in ("gemm", "attention", "elementwise", "tp_communication", "pp_communication", "bubble",
                     "dp_reduction", "optimizer"):
            a, b = getattr(own.time, part), getattr(best.time, part)
            if abs(a - b) > 0.02 * own.time.total:
                lines.append(f"  {part.replace('_', ' ')}: {a:.2f} s -> {b:.2f} s")
        if own.cfg.training.checkpoint_activations and not best.cfg.training.checkpoint_activations:
            lines.append("  it does not recompute activations (one forward less per micro-batch), which fits only "
                         + ("with sequence parallelism" if best.cfg.parallel.sequence_parallel else
                            "with this layout's smaller activations"))
    return "\n".join(lines), plans


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = parse_args(argv)
    try:
        cluster = build_cluster(args)
        cfg = load_config(args.config, args.overrides)
        kernels = KERNEL_SETS[args.kernels]
        from megatron.planning.plan import format_plan, make_plan

        plan = make_plan(cfg, cluster, kernels)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_plan(plan, args.tokens))
    result = plan.to_json(args.tokens)
    if args.search:
        text, plans = search_report(cfg, cluster, kernels, args.headroom, args.top,
                                    (False,) if args.no_sequence_parallel else (False, True))
        print()
        print(text)
        result["search"] = [{**pl.layout(), "memory_gib_per_gpu": pl.memory_bytes / 2**30,
                             "seconds_per_iteration": pl.time.total, **pl.metrics()} for pl in plans[:args.top]]
    if args.json:
        body = json.dumps(result, indent=2)
        if args.json == "-":
            print(body)
        else:
            Path(args.json).write_text(body + "\n")
            print(f"wrote {args.json}")
    if args.require_fit and not plan.fits:
        print(f"error: the layout needs {plan.memory_bytes / 2**30:.1f} GiB per GPU, more than the "
              f"{cluster.device.memory_bytes / 2**30:.0f} GiB of a {cluster.device.name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
