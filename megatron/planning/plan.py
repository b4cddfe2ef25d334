"""A whole plan: memory per GPU (megatron/training/memory.py) and time per iteration
(megatron/planning/timing.py) of one layout on one cluster, with Megatron's throughput figures
(megatron/training/metrics.py), and the search over layouts that fit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional

from megatron.config import Config, ConfigError
from megatron.planning import hardware as hw
from megatron.planning.timing import IterationTime, iteration_time
from megatron.training.memory import GB, Kernels, StageMemory, estimate_memory, micro_batches
from megatron.training.metrics import throughput


@dataclass(frozen=True)
class Plan:
    """The prediction for one layout."""

    cfg: Config
    cluster: hw.Cluster
    kernels: Kernels
    stages: list[StageMemory]
    time: IterationTime

    @property
    def data_parallel_size(self) -> int:
        """World size / (TP x PP)."""
        return self.cfg.data_parallel_size(self.cluster.world_size)

    @property
    def memory_bytes(self) -> float:
        """The largest stage's memory per GPU."""
        return max(st.total for st in self.stages)

    @property
    def fits(self) -> bool:
        """Whether every stage fits the device."""
        return self.memory_bytes <= self.cluster.device.memory_bytes

    def metrics(self) -> dict[str, float]:
        """TFLOP/s per GPU (hardware: recompute counted; model), MFU and tokens/s."""
        tr = self.cfg.training
        out = throughput(self.cfg.model, self.cfg.padded_vocab_size, tr.global_batch_size, self.time.total,
                         self.cluster.world_size, tr.checkpoint_activations, self.cluster.device.peak_flops)
        return {"tflops_per_gpu_hardware": out["hardware-tflops-per-device"],
                "tflops_per_gpu_model": out["tflops-per-device"], "mfu": out["mfu"],
                "tokens_per_second": out["tokens-per-second"]}

    def days_for(self, tokens: float) -> float:
        """Days to train ``tokens`` tokens at the predicted rate."""
        return tokens / self.metrics()["tokens_per_second"] / 86400

    def layout(self) -> dict:
        """The layout's knobs."""
        p, tr = self.cfg.parallel, self.cfg.training
        return {"tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
                "dp": self.data_parallel_size, "micro_batch_size": tr.micro_batch_size,
                "global_batch_size": tr.global_batch_size,
                "micro_batches": micro_batches(self.cfg, self.data_parallel_size),
                "recompute": tr.checkpoint_activations, "zero_stage": p.zero_stage,
                "sequence_parallel": p.sequence_parallel}

    def to_json(self, tokens: Optional[float] = None) -> dict:
        """The machine-readable plan (top-level fields as tools/plan.py --json documents)."""
        gib = 2**30
        out = {
            "memory_gib_per_gpu": self.memory_bytes / gib,
            "seconds_per_iteration": self.time.total,
            **self.metrics(),
            "fits": self.fits,
            "device": self.cluster.device.name,
            "device_memory_gib": self.cluster.device.memory_bytes / gib,
            "nodes": self.cluster.nodes, "gpus_per_node": self.cluster.gpus_per_node,
            "layout": self.layout(),
            "kernels": dataclasses.asdict(self.kernels),
            "time": self.time.as_dict(),
            "stages": [_stage_json(st) for st in self.stages],
        }
        if tokens:
            out["tokens"] = tokens
            out["days"] = self.days_for(tokens)
        return out


def _stage_json(st: StageMemory) -> dict:
    gib = 2**30
    parts = ("weights", "gradients", "low_precision_gradients", "optimizer", "activations", "working_set", "logits",
             "attention", "communication", "communication_in_backward", "context", "fragmentation")
    return {"stage": st.stage, "layers": st.layers, "parameters": st.parameters,
            "in_flight_micro_batches": st.in_flight,
            **{f"{part}_gib": getattr(st, part) / gib for part in parts},
            "peak_allocated_gib": st.peak_allocated / gib, "total_gib": st.total / gib}


def make_plan(cfg: Config, cluster: hw.Cluster, kernels: Optional[Kernels] = None) -> Plan:
    """Predict memory and time of ``cfg``'s layout on ``cluster`` (kernels: what
    megatron/model/kernels picks on the device unless given)."""
    cfg.validate(cluster.world_size)
    device_type = "cpu" if cluster.device.name == "cpu" else "cuda"
    kernels = kernels or Kernels.for_device(cfg, device_type)
    stages = estimate_memory(cfg, cluster.world_size, cluster.device, kernels)
    return Plan(cfg, cluster, kernels, stages, iteration_time(cfg, cluster, kernels))


def format_plan(plan: Plan, tokens: Optional[float] = None) -> str:
    """The plan as readable text: layout, the memory table, the time parts, throughput."""
    from megatron.training.memory import format_memory_table

    lay, dev, tm, met = plan.layout(), plan.cluster.device, plan.time, plan.metrics()
    lines = [
        f"cluster: {plan.cluster.nodes} x {plan.cluster.gpus_per_node} {dev.name} "
        f"({dev.memory_bytes / GB:.0f} GiB, {dev.peak_flops / 1e12:.0f} TFLOP/s peak each)",
        f"layout: TP{lay['tp']} PP{lay['pp']} DP{lay['dp']}, micro-batch {lay['micro_batch_size']}, global batch "
        f"{lay['global_batch_size']} ({lay['micro_batches']} micro-batches per DP rank), recompute "
        f"{'on' if lay['recompute'] else 'off'}, ZeRO-{lay['zero_stage']}, sequence parallel "
        f"{'on' if lay['sequence_parallel'] else 'off'}; kernels: attention {plan.kernels.attention}, "
        f"LM head {plan.kernels.head}",
        "memory per GPU, GiB (grads: fp32 accumulation + bf16; buffers: recompute working set, logits, "
        "attention scores and communication at their peak phase; ctx+frag: CUDA context, NCCL, allocator cache):",
        format_memory_table(plan.stages),
        f"peak: {plan.memory_bytes / GB:.1f} GiB ({plan.memory_bytes / 1e9:.1f} GB) per GPU, "
        f"{'fits' if plan.fits else 'DOES NOT FIT'} in {dev.memory_bytes / GB:.0f} GiB",
        f"time per iteration: {tm.total:.2f} s = GEMMs {tm.gemm:.2f} + attention {tm.attention:.2f} + elementwise "
        f"{tm.elementwise:.2f} + TP comm {tm.tp_communication:.2f} + PP p2p {tm.pp_communication:.2f} + bubble "
        f"{tm.bubble:.2f} + DP reduction {tm.dp_reduction:.2f} + optimizer {tm.optimizer:.2f} "
        f"(slowest stage {tm.slowest_stage})",
        f"throughput: {met['tflops_per_gpu_hardware']:.1f} TFLOP/s per GPU hardware (recompute counted), "
        f"{met['tflops_per_gpu_model']:.1f} model, MFU {100 * met['mfu']:.1f}%, "
        f"{met['tokens_per_second']:,.0f} tokens/s",
    ]
    if tokens:
        lines.append(f"{tokens:.3g} tokens: {plan.days_for(tokens):.1f} days")
    return "\n".join(lines)


def with_layout(cfg: Config, tp: int, pp: int, micro_batch: int, recompute: bool, zero: int, sp: bool) -> Config:
    """A copy of ``cfg`` with these layout knobs."""
    parallel = dataclasses.replace(cfg.parallel, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                   zero_stage=zero, sequence_parallel=sp)
    training = dataclasses.replace(cfg.training, micro_batch_size=micro_batch, checkpoint_activations=recompute)
    model = dataclasses.replace(cfg.model)
    return dataclasses.replace(cfg, parallel=parallel, training=training, model=model)


def candidate_layouts(cfg: Config, cluster: hw.Cluster, micro_batch_sizes=(1, 2, 4, 8),
                      sequence_parallel=(False, True)) -> Iterator[Config]:
    """Every layout (TP within a node, PP up to the layer count, DP the rest; micro-batch,
    recompute, ZeRO stage, sequence parallelism among ``sequence_parallel``) that the config's
    rules accept."""
    world, heads, layers = cluster.world_size, cfg.model.num_attention_heads, cfg.model.num_layers
    gbs = cfg.training.global_batch_size
    for tp in (1, 2, 4, 8, 16):
        if tp > cluster.gpus_per_node or heads % tp or world % tp:
            continue
        for pp in range(1, layers + 1):
            if world % (tp * pp):
                continue
            dp = world // (tp * pp)
            for mbs in micro_batch_sizes:
                if gbs % (mbs * dp):
                    continue
                for recompute in (True, False):
                    for zero in ((1,) if pp > 1 else (1, 2)):
                        for sp in (sequence_parallel if tp > 1 else (False,)):
                            candidate = with_layout(cfg, tp, pp, mbs, recompute, zero, sp)
                            try:
                                candidate.validate(world)
                            except ConfigError:
                                continue
                            yield candidate


def search(cfg: Config, cluster: hw.Cluster, headroom: float = 0.0, kernels: Optional[Kernels] = None,
           micro_batch_sizes=(1, 2, 4, 8), sequence_parallel=(False, True)) -> list[Plan]:
    """Layouts that fit ``cluster`` with ``headroom`` (a fraction of device memory kept free),
    fastest first."""
    budget = cluster.device.memory_bytes * (1 - headroom)
    plans = []
    for candidate in candidate_layouts(cfg, cluster, micro_batch_sizes, sequence_parallel):
        plan = make_plan(candidate, cluster, kernels)
        if plan.memory_bytes <= budget:
            plans.append(plan)
    return sorted(plans, key=lambda pl: pl.time.total)
