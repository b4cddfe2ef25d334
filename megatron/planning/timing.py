"""Time per iteration of a layout, part by part.

One iteration of 1F1B (DeepSpeed's pipeline schedule) over m micro-batches and PP stages takes

    (m + PP - 1) x (the slowest stage's forward + backward of one micro-batch)
    + DP gradient reduction + tied-embedding reduction + optimizer step (+ ZeRO's parameter all-gather)

so the bubble is (PP - 1) / m of the compute. A stage's micro-batch time is the sum of

- GEMMs: each matrix product of a layer on its TP shard (QKV [sb, h] x [h, 3h/t], projection,
  h -> 4h, 4h -> h, the LM head [sb, h] x [h, V/t]) at an efficiency that depends on its shape:
  the device's best achievable matmul fraction x the tile/wave quantisation of its output over
  the SMs, or its memory time when that is longer (small or skinny products);
- attention: an O(s) kernel (flash-class) at its published efficiency, or, for kernels that
  materialise the scores, batched GEMMs over [s, s] per head plus the softmax's memory traffic
  and ALiBi's bias, which ``baddbmm`` expands into the scores before adding the product;
- elementwise kernels (LayerNorms, bias-GeLU, bias-dropout-add, transposes) as HBM traffic;
- TP all-reduces (2 in the forward, 2 in the backward, 2 more in a recompute), not overlapped
  with compute (Megatron's and our tensor parallelism);
- pipeline sends and receives of the stage's activation and its gradient (with 2022's
  Megatron-DeepSpeed, the causal mask too) over the network's measured NCCL bandwidth;
- bf16 runs: BF16_Optimizer's accumulation of the bf16 gradients into the fp32 buffer after each
  micro-batch (a temporary fp32 copy, then the add: 18 bytes moved per parameter);
- the last stage: the LM head's GEMMs and the cross entropy's passes over the logits.

The backward costs twice the forward's GEMMs; activation recompute adds one forward.
Every rate comes from megatron/planning/hardware.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from megatron.config import Config
from megatron.planning import hardware as hw
from megatron.training.memory import Kernels, micro_batches, stage_layers


@dataclass(frozen=True)
class IterationTime:
    """Seconds per iteration, by part (compute parts summed over the whole pipeline schedule)."""

    gemm: float
    attention: float
    elementwise: float
    tp_communication: float
    pp_communication: float
    bubble: float
    dp_reduction: float
    optimizer: float
    slowest_stage: int

    @property
    def total(self) -> float:
        """The iteration's wall time."""
        return (self.gemm + self.attention + self.elementwise + self.tp_communication + self.pp_communication
                + self.bubble + self.dp_reduction + self.optimizer)

    def as_dict(self) -> dict:
        """The parts and the total, for JSON."""
        return {**asdict(self), "total": self.total}


def gemm_efficiency(m: int, n: int, k: int, device: hw.DeviceProfile) -> float:
    """Fraction of peak an [m, k] x [k, n] product reaches: the best achievable matmul fraction
    times the useful share of its 256x128 output tiles and of their last wave over the SMs."""
    tm, tn = hw.GEMM_TILE
    tiles = math.ceil(m / tm) * math.ceil(n / tn)
    tile_use = (m * n) / (tiles * tm * tn)
    waves = math.ceil(tiles / device.sms)
    wave_use = tiles / (waves * device.sms)
    return device.matmul_efficiency * tile_use * wave_use


def gemm_seconds(m: int, n: int, k: int, device: hw.DeviceProfile, bytes_per_element: int = 2, batch: int = 1) -> float:
    """Time of ``batch`` [m, k] x [k, n] products: compute at the shape's efficiency, or the
    time to move the operands and result through HBM if that is longer."""
    flops = 2.0 * m * n * k * batch
    compute = flops / (device.peak_flops * gemm_efficiency(m, n * batch, k, device))
    memory = bytes_per_element * (m * k + k * n + m * n) * batch / (device.hbm_bandwidth * hw.HBM_EFFICIENCY)
    return max(compute, memory)


def _all_reduce_seconds(nbytes: float, ranks: int, bus_bandwidth: float) -> float:
    """A ring all-reduce of ``nbytes`` over ``ranks`` at ``bus_bandwidth`` [NCCL]."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / bus_bandwidth


def _all_gather_seconds(nbytes: float, ranks: int, bus_bandwidth: float) -> float:
    """A ring all-gather (or reduce-scatter) producing ``nbytes`` on each of ``ranks``."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    return (ranks - 1) / ranks * nbytes / bus_bandwidth


def _dp_bus_bandwidth(cluster: hw.Cluster, t: int, pp: int, d: int) -> float:
    """Bus bandwidth of a DP group's ring. Ranks are placed TP innermost, then DP, then PP
    (DeepSpeed's PipeModelDataParallelTopology); a group inside one node runs over NVLink,
    one spanning nodes shares each node's NICs with the other groups crossing that node."""
    per_node = max(cluster.gpus_per_node // t, 1)
    if d <= per_node:
        return cluster.intra_bandwidth
    groups_crossing = cluster.gpus_per_node // min(per_node, d)
    return cluster.inter_node_bus_bandwidth / max(groups_crossing, 1)


def _p2p_bandwidth(cluster: hw.Cluster, t: int, d: int) -> float:
    """Per-rank bandwidth of a send to the next pipeline stage: over NVLink when both stages
    share a node, else the node's NICs shared by all its ranks sending at once."""
    if t * d < cluster.gpus_per_node:
        return cluster.intra_bandwidth
    return cluster.inter_node_bus_bandwidth / cluster.gpus_per_node


def iteration_time(cfg: Config, cluster: hw.Cluster, kernels: Kernels) -> IterationTime:
    """Predicted seconds per iteration (at the full global batch) on ``cluster``."""
    dev = cluster.device
    m, p, tr = cfg.model, cfg.parallel, cfg.training
    t, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    d = cfg.data_parallel_size(cluster.world_size)
    s, b, h, a, V = m.seq_length, tr.micro_batch_size, m.hidden_size, m.num_attention_heads, cfg.padded_vocab_size
    f = m.ffn_size
    low = tr.bf16 or tr.fp16
    act = 2 if low else 4
    n = s * b
    hbm = dev.hbm_bandwidth * hw.HBM_EFFICIENCY
    # One layer's forward on one TP rank.
    gemm_fwd = (gemm_seconds(n, 3 * h // t, h, dev, act) + gemm_seconds(n, h, h // t, dev, act)
                + gemm_seconds(n, f // t, h, dev, act) + gemm_seconds(n, h, f // t, dev, act))
    heads = a // t
    hd = h // a
    if kernels.attention == "flash":
        # A causal kernel computes half of QK^T and PV: 2 products of 2 b heads s^2 hd / 2 FLOPs;
        # its backward does 2.5x the forward's work (it recomputes the probabilities).
        attn_fwd = (2 * 2 * b * heads * s * s * hd / 2) / (dev.peak_flops * hw.FLASH_ATTENTION_EFFICIENCY)
        attn_bwd = 2.5 * attn_fwd
    else:
        bmm = gemm_seconds(s, s, hd, dev, act, batch=b * heads) + gemm_seconds(s, hd, s, dev, act, batch=b * heads)
        softmax = 2 * act * b * heads * s * s / hbm  # read the scores, write the probabilities
        # ALiBi (BLOOM's only position encoding): baddbmm's input is the [b*np, 1, s] bias, so
        # it is first expanded into the [b*np, s, s] output (a write) and then read back by the
        # GEMM's beta term, on top of the GEMM's own write that ``bmm`` counts [MDS22].
        alibi = 2 * act * b * heads * s * s / hbm if kernels.alibi else 0.0
        attn_fwd = bmm + softmax + alibi
        attn_bwd = 2 * bmm + 2 * softmax  # the bias has no gradient
    elementwise_fwd = (hw.ELEMENTWISE_BYTES_PER_SBH + hw.ELEMENTWISE_BYTES_PER_SBH_PER_TP / t) * n * h * act / 2 / hbm
    tp_bytes = n * h * act
    tp_one = _all_reduce_seconds(tp_bytes, t, cluster.intra_bandwidth)
    forwards = 2 if tr.checkpoint_activations else 1
    layer = {
        "gemm": forwards * gemm_fwd + 2 * gemm_fwd,
        "attention": forwards * attn_fwd + attn_bwd,
        "elementwise": (forwards + 2) * elementwise_fwd,
        "tp": (2 * forwards + 2) * tp_one,
    }
    head_gemm = gemm_seconds(n, V // t, h, dev, act)
    head_passes = 4 if kernels.head == "fused_linear" else 3  # the fused head recomputes its logits
    # The full-logits cross entropy (Megatron's vocab-parallel one; ours, F.cross_entropy over
    # the logits cast to fp32, makes passes of the same kind) goes over the fp32 [s, b, V/t]
    # logits several times [MDS22]; the fused and chunked heads keep to four fp32 passes plus the
    # bf16 logits' write and read.
    ce_bytes = hw.CROSS_ENTROPY_BYTES_PER_LOGIT if kernels.head == "reference" else 4 * 4 + 2 * act
    head = {"gemm": head_passes * head_gemm,
            "elementwise": ce_bytes * n * (V // t) / hbm,
            "tp": 2 * _all_reduce_seconds(n * 4 * 2, t, cluster.intra_bandwidth)}  # max and sum-exp per token
    p2p_bytes = n * h * act / (t if t > 1 else 1)  # DeepSpeed sends 1/t per TP rank, then all-gathers
    p2p_one = p2p_bytes / _p2p_bandwidth(cluster, t, d) + hw.P2P_LATENCY_S
    p2p_one += _all_gather_seconds(n * h * act, t, cluster.intra_bandwidth) if t > 1 else 0.0
    # DeepSpeed sends every tensor of the output tuple: the [1, 1, s, s] bool mask goes with each
    # activation (not with the gradient) as one more message [DS06] [MDS22].
    mask_one = (s * s / _p2p_bandwidth(cluster, t, d) + hw.P2P_LATENCY_S) if kernels.pipeline_sends_mask else 0.0
    stage_times = []
    layers = stage_layers(cfg)
    for stage, (_, _, params, blocks) in enumerate(layers):
        parts = {k: blocks * v for k, v in layer.items()}
        if stage == pp - 1:
            for k, v in head.items():
                parts[k] += v
        # Receive the input and send the output forward, the reverse backward (not the ends).
        parts["pp"] = (2 * p2p_one + mask_one) * ((stage > 0) + (stage < pp - 1))
        # The gradients' accumulation after every micro-batch: BF16_Optimizer's fp32 one [DS06],
        # unless the kernel set says otherwise (Megatron-LM's fp16 main_grad).
        if low:
            accumulation = kernels.grad_accumulation_bytes
            parts["elementwise"] += params * (hw.BF16_GRAD_ACCUMULATION_BYTES if accumulation is None
                                              else accumulation) / hbm
        stage_times.append(parts)
    slowest = max(range(pp), key=lambda i: sum(stage_times[i].values()))
    worst = stage_times[slowest]
    mb = micro_batches(cfg, d)
    per_mb = sum(worst.values())
    bubble = (pp - 1) * per_mb
    # After the flush: DP all-reduce of the fp32 gradients (or ZeRO's reduce-scatter + all-gather,
    # the same volume), the tied embedding's all-reduce between first and last stage, the step.
    params = max(layers[slowest][2], 1)
    dp_bw = _dp_bus_bandwidth(cluster, t, pp, d)
    dp = _all_reduce_seconds(4.0 * params, d, dp_bw)
    if p.zero_stage >= 1 and d > 1:
        dp += _all_gather_seconds(act * params, d, dp_bw)  # the updated weights, gathered back
    if pp > 1:
        embedding = V // t * h * 4.0
        dp += _all_reduce_seconds(embedding, 2, cluster.inter_node_bus_bandwidth / cluster.gpus_per_node
                                  if cluster.nodes > 1 else cluster.intra_bandwidth)
    shard = params / (d if p.zero_stage >= 1 else 1)
    # AdamW: read master, grad, two moments; write master, two moments (+ the bf16 copy); the
    # gradient norm reads every fp32 gradient; zeroing writes them (and the bf16 ones).
    optimizer = (shard * (4 * 4 + 3 * 4 + (2 if low else 0)) + params * (4 + 4 + (2 if low else 0))) / hbm
    return IterationTime(
        gemm=mb * worst["gemm"], attention=mb * worst["attention"], elementwise=mb * worst["elementwise"],
        tp_communication=mb * worst["tp"], pp_communication=mb * worst["pp"], bubble=bubble,
        dp_reduction=dp, optimizer=optimizer, slowest_stage=slowest)
