"""Every constant the planner uses that is not a law of arithmetic, with its source.

Nothing here was fitted to BLOOM-176B's logged figures (59 GB per GPU, 105.22 s per iteration):
those are what the planner predicts (tests/test_planner.py checks them), never an input. A value
that is an estimate rather than a measurement says so. To plan for another machine, add a
profile here; to correct a value, change it here and cite the new source.

Sources (cited by key below):

[A100]   NVIDIA A100 Tensor Core GPU datasheet (2021): 312 TFLOP/s dense BF16; A100-40GB HBM2
         1,555 GB/s, A100-80GB HBM2e 2,039 GB/s; NVLink 3: 600 GB/s per GPU (both directions);
         108 SMs (NVIDIA A100 architecture whitepaper).
[H100]   NVIDIA H100 Tensor Core GPU datasheet: SXM 989 TFLOP/s dense BF16, 80 GB HBM3
         3.35 TB/s, NVLink 4: 900 GB/s per GPU; 132 SMs (H100 architecture whitepaper).
[H200]   NVIDIA H200 datasheet: same GPU and NVLink as H100 SXM, 141 GB HBM3e at 4.8 TB/s.
[MAMF]   S. Bekman, "Machine Learning Engineering", compute/accelerator, Maximum Achievable
         Matmul FLOPS table (brute-force search over BF16 matmul shapes with mamf-finder.py):
         A100 SXM 267.9 of 312 (85.9%), H100 SXM 792.1 of 989 (80.1%), GH200 821.0 of 989
         (83.0%, the same Hopper GPU as H200 with HBM3e).
[GEMM]   NVIDIA Deep Learning Performance Guide, "Matrix Multiplication Background": cuBLAS
         computes a GEMM in output tiles (256x128 is the largest tile on Ampere/Hopper) spread
         over the SMs in waves; a partial last wave or partial tiles waste throughput ("tile
         and wave quantization"), and small dimensions make a GEMM memory-bound.
[NCCL]   NCCL user guide, "Performance" / nccl-tests PERFORMANCE.md: bus bandwidth
         busBW = algBW * 2 (n - 1) / n for all-reduce, (n - 1) / n for all-gather and
         reduce-scatter; a ring all-reduce's bus bandwidth approaches the slowest link's
         unidirectional bandwidth. NCCL_BUFFSIZE defaults to 4 MiB.
[BLOOM]  BigScience, "BLOOM: A 176B-Parameter Open-Access Multilingual Language Model"
         (arXiv 2211.05100), section 3.4 and the model card: Jean Zay A100 partition, 8 A100
         80GB per node with NVLink, nodes connected by 4 Omni-Path 100 Gb/s links each
         (Omni-Path Architecture, dedicated NCCL subnet). (Not InfiniBand HDR.)
[DS]     DeepSpeed 0.19 source: ``MEMORY_OPT_ALLREDUCE_SIZE = 500_000_000`` elements per
         buffer of the pipeline engine's gradient all-reduce (runtime/engine.py); ZeRO-1/2's
         reduction buffer holds ``reduce_bucket_size`` elements (set in
         megatron/training/engine.py).
[GMLAKE] C. Guo et al., "GMLake: Efficient and Transparent GPU Memory Defragmentation for
         Large-scale DNN Training with Virtual Memory Stitching", ASPLOS 2024: PyTorch's
         caching allocator leaves on average 15% (up to 33%) of reserved memory fragmented
         over eight LLM training setups on A100-80GB (recompute, ZeRO, offload).
[CTX]    CUDA context + framework kernels per process. Estimate, not measured here (no GPU on
         the development machine): PyTorch's CUDA semantics notes say the context and loaded
         kernels take memory that the caching allocator does not report; with CUDA < 11.7
         (eager module loading, e.g. BLOOM's PyTorch 1.11 + CUDA 11.5) it is commonly ~1 GiB
         on A100/H100. Measure it as ``nvidia-smi`` used minus ``torch.cuda.memory_reserved()``.
[STREAM] Achievable HBM bandwidth for large elementwise kernels: ~80% of the datasheet
         figure (BabelStream-class copy/triad results on A100 and H100 reach 80-90%).
[JZNET]  BigScience, bigscience-workshop/bigscience, experiments/bandwidth/ (all_reduce_bench.py,
         all_reduce_bench-a100-n4.slurm and .txt, January 2022): a 4 GB fp32 ``all_reduce`` over
         4 Jean Zay A100-80GB nodes x 8 GPUs (32 ranks) in BLOOM's own environment
         (start-tr11-176B-ml, NCCL 2.10.3 over the Omni-Path hfi1 NICs as "NET/IB") takes 1.529 s
         once warm (trials 3-5), a bus bandwidth of 4e9 / 1.529 x 2 x 31/32 = 5.07 GB/s (the
         file's "busbw: 40.5 Gbps"). Its NCCL_DEBUG lines show the ring's two channels leaving
         every node through one NIC and entering through one other ("via NET/IB/3", "NET/IB/1"),
         so one 100 Gb/s OPA NIC carried 5.07 GB/s: 40.5% of its 12.5 GB/s wire rate. (Earlier,
         on two V100 nodes in 2021, experiments/README.md notes ~135 Gbps; S. Bekman's
         "Machine Learning Engineering", network chapter, quotes that figure for Jean Zay. The
         A100 measurement is the one of BLOOM's partition and software.)
[DS06]   DeepSpeed v0.6.5 (May 2022, the generation BLOOM ran: BF16_Optimizer, PipelineEngine):
         runtime/bf16_optimizer.py ``update_hp_grads``: ``hp_grad.data.add_(lp.grad.data.to(
         hp_grad.dtype))`` after every micro-batch's backward (pipe/engine.py
         ``_exec_backward_pass``), so a temporary fp32 copy (read 2, write 4 bytes per parameter)
         and the accumulation (read 4 + 4, write 4): 18 bytes per parameter; the bf16 gradients
         are set to None before each backward (``clear_lp_grads``), so nothing else is zeroed.
         pipe/engine.py ``_exec_send_activations`` sends every tensor of a stage's output tuple
         (the partitioned hidden state's meta and data, then the rest unpartitioned);
         ``_exec_reduce_tied_grads`` all-reduces the tied embedding's fp32 ``_hp_grad``.
[MDS22]  bigscience-workshop/Megatron-DeepSpeed, main as of June 2022 (BLOOM's code):
         model/gpt_model.py ``GPTModelPipe``: the embedding stage returns (hidden, attention
         mask) and every transformer stage passes the mask on, so the [1, 1, s, s] bool causal
         mask travels with each micro-batch's activations; ``float16_to_fp32`` casts the bf16
         logits to fp32 before ``CrossEntropy``. mpu/cross_entropy.py
         ``_VocabParallelCrossEntropy`` then makes full passes over the fp32 [s, b, V/t] logits:
         max (read), sub_ (read + write), exp (read + write), sum (read), div_ (read + write);
         its backward mul_ (read + write), and the cast back to bf16 (read 4, write 2).
         model/transformer.py ``ParallelAttention``: with ALiBi, ``torch.baddbmm(alibi[...],
         q, k^T, beta=..)`` starts from the [b*np, 1, s] bias broadcast to [b*np, s, s], so
         the scores are written once by the expand into the output and read again by the
         GEMM's beta term, besides the GEMM's own write.
[HERE]   Measured on this development machine (tests/test_planner_cpu_memory.py): the CPU
         profile has no CUDA context and no allocator cache, the peak is of live tensor bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.errors import UsageError

GB = 1e9
GiB = 2**30


@dataclass(frozen=True)
class DeviceProfile:
    """One accelerator: peak dense throughput and memory, and the efficiencies the planner uses."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s (fp32 for the CPU profile)
    memory_bytes: float  # what the device offers
    hbm_bandwidth: float  # bytes/s, datasheet
    matmul_efficiency: float  # best achievable fraction of peak for a large GEMM [MAMF]
    sms: int  # streaming multiprocessors: GEMM tiles run in waves of this many [GEMM]
    intra_node_bus_bandwidth: float  # NCCL bus bandwidth inside a node, bytes/s
    context_bytes: float  # CUDA context + kernels, outside the allocator [CTX]
    fragmentation: float  # fraction of reserved memory the caching allocator leaves unused [GMLAKE]
    source: str


# NVLink bus bandwidth: a ring all-reduce over NVLink reaches about half the per-GPU NVLink
# figure quoted in both directions, i.e. the unidirectional link bandwidth [NCCL]: A100 300 GB/s,
# H100/H200 450 GB/s. NCCL's own tests report ~230 GB/s (A100) and ~370-480 GB/s (H100) bus
# bandwidth for large all-reduces inside a DGX; the planner takes 80% of unidirectional
# NVLink, in that range.
_NVLINK_EFFICIENCY = 0.8
HBM_EFFICIENCY = 0.8  # [STREAM]
_CUDA_CONTEXT = 1.0 * GiB  # [CTX]
_FRAGMENTATION = 0.15  # [GMLAKE], mean over eight LLM setups on A100-80GB

DEVICES: dict[str, DeviceProfile] = {
    "a100-40gb": DeviceProfile("a100-40gb", 312e12, 40 * GiB, 1555e9, 0.859, 108, _NVLINK_EFFICIENCY * 300e9,
                               _CUDA_CONTEXT, _FRAGMENTATION, "[A100] [MAMF]"),
    "a100-80gb": DeviceProfile("a100-80gb", 312e12, 80 * GiB, 2039e9, 0.859, 108, _NVLINK_EFFICIENCY * 300e9,
                               _CUDA_CONTEXT, _FRAGMENTATION, "[A100] [MAMF]"),
    "h100": DeviceProfile("h100", 989e12, 80 * GiB, 3350e9, 0.801, 132, _NVLINK_EFFICIENCY * 450e9,
                          _CUDA_CONTEXT, _FRAGMENTATION, "[H100] [MAMF]"),
    "h200": DeviceProfile("h200", 989e12, 141 * GB, 4800e9, 0.830, 132, _NVLINK_EFFICIENCY * 450e9,
                          _CUDA_CONTEXT, _FRAGMENTATION, "[H200] [MAMF] (GH200 row)"),
    # The development CPU: memory is the live tensor bytes torch allocates (no CUDA context, no
    # caching allocator: glibc returns freed blocks), so context and fragmentation are zero
    # [HERE]. Its speed is not modelled for planning (peak_flops is nominal: 2 AVX2 cores).
    "cpu": DeviceProfile("cpu", 1e11, 23 * GiB, 20e9, 0.5, 2, 5e9, 0.0, 0.0, "[HERE]"),
}


# NCCL over InfiniBand reaches ~90% of the wire rate as bus bandwidth for large messages
# (nccl-tests multi-node all-reduce results on HDR: ~22-24 GB/s per 200 Gb/s NIC) [NCCL]; the
# default for a network given only by its rate (--inter-node-gbps).
NETWORK_EFFICIENCY = 0.9


@dataclass(frozen=True)
class Cluster:
    """Nodes of identical devices and the network between them."""

    device: DeviceProfile
    nodes: int
    gpus_per_node: int
    inter_node_bandwidth: float  # bytes/s per node, all NICs together, unidirectional wire rate
    intra_node_bus_bandwidth: Optional[float] = None  # bytes/s; None: the device's NVLink figure
    network_efficiency: float = NETWORK_EFFICIENCY  # NCCL bus bandwidth / wire rate

    @property
    def inter_node_bus_bandwidth(self) -> float:
        """NCCL bus bandwidth a node's NICs deliver together, bytes/s."""
        return self.inter_node_bandwidth * self.network_efficiency

    @property
    def world_size(self) -> int:
        """All devices."""
        return self.nodes * self.gpus_per_node

    @property
    def intra_bandwidth(self) -> float:
        """NCCL bus bandwidth between devices of one node."""
        return self.intra_node_bus_bandwidth or self.device.intra_node_bus_bandwidth


# Inter-node links, wire rate. Jean Zay (BLOOM): 4 x Omni-Path 100 Gb/s per node [BLOOM] = 50 GB/s
# per node. A DGX A100 / H100 SuperPOD node: 8 x InfiniBand HDR 200 Gb/s (A100) or NDR 400 Gb/s
# (H100) compute NICs, one per GPU (NVIDIA DGX SuperPOD reference architectures).
NETWORKS: dict[str, float] = {
    "omnipath-4x100": 4 * 100e9 / 8,
    "ib-hdr-8x200": 8 * 200e9 / 8,
    "ib-ndr-8x400": 8 * 400e9 / 8,
    "none": 0.0,
}
DEFAULT_NETWORK = {"a100-40gb": "ib-hdr-8x200", "a100-80gb": "ib-hdr-8x200", "h100": "ib-ndr-8x400",
                   "h200": "ib-ndr-8x400", "cpu": "none"}
# Measured where a measurement of the network exists. Jean Zay's Omni-Path under NCCL 2.10:
# 5.07 GB/s per 12.5 GB/s NIC [JZNET].
NETWORK_EFFICIENCIES: dict[str, float] = {
    "omnipath-4x100": 5.07e9 / 12.5e9,
    "ib-hdr-8x200": NETWORK_EFFICIENCY,
    "ib-ndr-8x400": NETWORK_EFFICIENCY,
    "none": NETWORK_EFFICIENCY,
}
# Latency per message for point-to-point sends between pipeline stages (NCCL over IB/OPA: a
# few microseconds; launch + synchronisation of a blocking send/recv pair ~ 30 us).
P2P_LATENCY_S = 30e-6

# BF16_Optimizer's per-micro-batch accumulation of the bf16 gradients into its fp32 buffer, bytes
# moved per parameter: the ``.to(float32)`` copy (2 + 4) and the ``add_`` (4 + 4 + 4) [DS06].
BF16_GRAD_ACCUMULATION_BYTES = 18.0

# The vocab-parallel cross entropy over full fp32 logits, bytes moved per logit element on one
# TP rank [MDS22]: forward cast to fp32 2 + 4, max 4, sub_ 8, exp 8, sum 4, div_ 8; backward
# mul_ 8 and the cast back 4 + 2.
CROSS_ENTROPY_BYTES_PER_LOGIT = 6 + 4 + 8 + 8 + 4 + 8 + 8 + 6

# GEMM output tile for the wave-quantization model [GEMM].
GEMM_TILE = (256, 128)

# Memory-bound elementwise work per transformer layer and micro-batch, in multiples of
# s * b * h bytes moved (bf16), for one forward pass. Counted from the kernels the layer runs
# (Megatron's fused kernels; each is read + written once): input LayerNorm 4, QKV transpose
# and ALiBi score setup 6, attention output transpose 4, bias-dropout-add 6, post LayerNorm 4,
# bias-dropout-add 6 = 30; plus bias-GeLU on the 4h activation, 16 / t. The backward pass
# moves about twice as much.
ELEMENTWISE_BYTES_PER_SBH = 30.0
ELEMENTWISE_BYTES_PER_SBH_PER_TP = 16.0

# DeepSpeed's flat all-reduce buffer of the engine's gradient reduction (its constant, not
# ours) [DS]. ZeRO's reduction bucket is our choice: megatron/training/engine.py's
# REDUCE_BUCKET_ELEMENTS.
PIPELINE_ALLREDUCE_ELEMENTS = 500_000_000


def device(name: str) -> DeviceProfile:
    """The profile called ``name``; the error lists the known ones."""
    try:
        return DEVICES[name]
    except KeyError:
        raise UsageError(f"unknown GPU profile {name!r}: choose one of {sorted(DEVICES)} "
                         "(or add one to megatron/planning/hardware.py with its source)") from None

# NCCL buffers per communicator: NCCL_BUFFSIZE (4 MiB, documented default) for each of its 3
# protocols, per channel and direction, over 16 channels (NCCL's usual count on NVLink systems,
# printed by NCCL_DEBUG=INFO) [NCCL]: 4 MiB x 3 x 2 x 16 = 384 MiB, an upper estimate (the LL
# protocols' buffers are smaller).
NCCL_BYTES_PER_COMMUNICATOR = 4 * 2**20 * 3 * 2 * 16

# Attention with an O(s) kernel (flash-attn 2, FlexAttention): fraction of peak its causal
# forward + backward reaches at head dim 64-128 and s = 2k-8k. T. Dao, "FlashAttention-2"
# (arXiv 2307.08691), Figure: A100 forward + backward, causal, head dim 128: ~170-190 of 312
# TFLOP/s. The planner takes 0.55 of peak for the FLOPs a causal kernel really does (half of
# the full s x s product that Megatron's formula counts).
FLASH_ATTENTION_EFFICIENCY = 0.55
