"""The planner (tools/plan.py) against BLOOM-176B's published figures, on the six sizes'
layouts, and its layout search."""

from __future__ import annotations

import json

import pytest

from conftest import CONFIGS
from tools import plan as plan_cli

# BLOOM-176B's final layout as BigScience ran it (tr11-176B-ml): 48 nodes x 8 A100-80GB on
# Jean Zay (4 x Omni-Path 100 Gb/s per node), TP4 PP12 DP8, micro-batch 2, global batch 2048,
# seq 2048, bf16, ZeRO-1 (BF16_Optimizer), full recompute. Published figures, typed in from
# BigScience's tr11 chronicles and README (not produced by any code here):
PUBLISHED_GB_PER_GPU = 59.0  # nvidia-smi, so CUDA context and the allocator's cache included
PUBLISHED_SECONDS_PER_ITERATION = 105.22
PUBLISHED_TFLOPS_HARDWARE = 149.02  # Megatron-DeepSpeed's formula, factor 4 for recompute

BLOOM_176B = ["--config", str(CONFIGS / "bloom-176b.yaml"), "--gpu", "a100-80gb", "--nodes", "48",
              "--gpus-per-node", "8", "--network", "omnipath-4x100", "--kernels", "megatron-deepspeed"]


@pytest.fixture(scope="module")
def bloom_plan(tmp_path_factory):
    """tools/plan.py's JSON for BLOOM-176B's layout on its cluster, with its own software's kernels."""
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    assert plan_cli.main([*BLOOM_176B, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_bloom_176b_memory_per_gpu_within_10_percent_of_published(bloom_plan):
    predicted_gb = bloom_plan["memory_gib_per_gpu"] * 2**30 / 1e9
    assert abs(predicted_gb - PUBLISHED_GB_PER_GPU) / PUBLISHED_GB_PER_GPU <= 0.10, predicted_gb


def test_bloom_176b_seconds_per_iteration_within_10_percent_of_published(bloom_plan):
    predicted = bloom_plan["seconds_per_iteration"]
    assert abs(predicted - PUBLISHED_SECONDS_PER_ITERATION) / PUBLISHED_SECONDS_PER_ITERATION <= 0.10, predicted


def test_bloom_176b_hardware_tflops_within_10_percent_of_published(bloom_plan):
    predicted = bloom_plan["tflops_per_gpu_hardware"]
    assert abs(predicted - PUBLISHED_TFLOPS_HARDWARE) / PUBLISHED_TFLOPS_HARDWARE <= 0.10, predicted


def test_bloom_176b_json_is_consistent_with_megatrons_formula(bloom_plan):
    """TFLOP/s x GPUs x seconds = 4 x 24 B s L h^2 (1 + s/6h + V/16Lh), written out here."""
    B, s, L, h, V = 2048, 2048, 70, 14336, 250880
    hardware_flops = 4 * 24 * B * s * L * h * h * (1 + s / (6 * h) + V / (16 * L * h))
    assert bloom_plan["tflops_per_gpu_hardware"] * 1e12 * 384 * bloom_plan["seconds_per_iteration"] == \
        pytest.approx(hardware_flops, rel=1e-9)
    assert bloom_plan["tflops_per_gpu_model"] == pytest.approx(bloom_plan["tflops_per_gpu_hardware"] * 3 / 4)
    assert bloom_plan["mfu"] == pytest.approx(bloom_plan["tflops_per_gpu_model"] / 312)
    assert bloom_plan["tokens_per_second"] == pytest.approx(B * s / bloom_plan["seconds_per_iteration"])
    stages = bloom_plan["stages"]
    assert len(stages) == 12 and max(st["total_gib"] for st in stages) == bloom_plan["memory_gib_per_gpu"]
    # BF16_Optimizer: bf16 weights, fp32 gradient buffer, fp32 master + Adam moments over DP 8.
    middle = stages[5]
    params = middle["parameters"]
    assert middle["weights_gib"] * 2**30 == 2 * params
    assert middle["gradients_gib"] * 2**30 == 4 * params
    assert middle["optimizer_gib"] * 2**30 == pytest.approx(12 * params / 8)
    # 1F1B: the first stage holds 12 micro-batches in flight, the last one.
    assert [st["in_flight_micro_batches"] for st in stages] == list(range(12, 0, -1))


# Out of sample, not BLOOM: Megatron-LM's README (2021-2022) for examples/pretrain_gpt3_175B.sh,
# GPT-3 175B (96 layers, hidden 12288, 96 heads, vocabulary 51,200, seq 2048) on 128 Selene
# nodes x 8 A100-80GB (8 x InfiniBand HDR each), TP8 PP16 DP8, micro-batch 1, global batch 1536,
# fp16, full ("uniform") recompute: "each iteration takes around 32 seconds resulting in 138
# teraFLOPs per GPU".
GPT3_175B_SELENE = ["--config", str(CONFIGS / "bloom-176b.yaml"), "--gpu", "a100-80gb", "--nodes", "128",
                    "--gpus-per-node", "8", "--network", "ib-hdr-8x200", "--kernels", "megatron-lm",
                    *[arg for field in ("model.num_layers=96", "model.hidden_size=12288",
                                        "model.num_attention_heads=96", "model.vocab_size=51200",
                                        "model.pad_vocab_size_to=51200", "model.embed_layernorm=false",
                                        "parallel.tensor_model_parallel_size=8",
                                        "parallel.pipeline_model_parallel_size=16",
                                        "parallel.pp_partition_method=type:transformer",
                                        "training.micro_batch_size=1", "training.global_batch_size=1536",
                                        "training.bf16=false", "training.fp16=true")
                      for arg in ("--set", field)]]
GPT3_175B_PUBLISHED_SECONDS = 32.0


@pytest.mark.xfail(strict=True, reason="predicts 28.6 s (-10.6%): on InfiniBand the time model is ~10% optimistic "
                   "for Megatron-LM's own run; see bench/README.md, 'Planner', out of sample")
def test_gpt3_175b_on_selene_within_10_percent_of_megatron_lms_published_time(tmp_path):
    """The same time model on another cluster, network and model, checked against a figure no
    constant was taken from, with Megatron-LM's own kernels (no ALiBi, no mask sent between
    stages, fp16 main_grad accumulation)."""
    out = tmp_path / "gpt3.json"
    assert plan_cli.main([*GPT3_175B_SELENE, "--json", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["layout"]["dp"] == 8 and plan["layout"]["micro_batches"] == 192
    predicted = plan["seconds_per_iteration"]
    assert abs(predicted - GPT3_175B_PUBLISHED_SECONDS) / GPT3_175B_PUBLISHED_SECONDS <= 0.10, predicted


LAYOUTS = {  # size: nodes x 8 GPUs, as slurm/bloom-<size>.slurm launches it
    "560m": 4, "1b1": 4, "1b7": 8, "3b": 8, "7b1": 16, "176b": 48,
}


@pytest.mark.parametrize("size", LAYOUTS)
def test_each_size_plans_on_its_layout(size, capsys):
    code = plan_cli.main(["--config", str(CONFIGS / f"bloom-{size}.yaml"), "--gpu", "a100-80gb", "--nodes",
                          str(LAYOUTS[size]), "--gpus-per-node", "8", "--json", "-", "--require-fit"])
    out = capsys.readouterr().out
    assert code == 0, out
    plan = json.loads(out[out.index("{\n"):])
    for key in ("memory_gib_per_gpu", "seconds_per_iteration", "tflops_per_gpu_hardware", "tflops_per_gpu_model",
                "mfu", "tokens_per_second", "stages"):
        assert key in plan
    assert 0 < plan["memory_gib_per_gpu"] <= 80 and 0 < plan["mfu"] < 1
    assert "time per iteration:" in out and "TFLOP/s per GPU hardware" in out


def test_unknown_gpu_is_refused_with_the_choices(capsys):
    assert plan_cli.main(["--config", str(CONFIGS / "bloom-560m.yaml"), "--gpu", "v100"]) == 2
    err = capsys.readouterr().err
    assert "unknown GPU profile 'v100'" in err and "a100-80gb" in err and "megatron/planning/hardware.py" in err


def test_search_on_one_node_ranks_layouts_that_fit(capsys):
    assert plan_cli.main(["--config", str(CONFIGS / "bloom-1b7.yaml"), "--gpu", "a100-40gb", "--nodes", "1",
                          "--search", "--headroom", "0.1", "--top", "3", "--json", "-"]) == 0
    out = capsys.readouterr().out
    plan = json.loads(out[out.index("{\n"):])
    ranked = plan["search"]
    assert 1 <= len(ranked) <= 3
    times = [r["seconds_per_iteration"] for r in ranked]
    assert times == sorted(times)
    assert all(r["memory_gib_per_gpu"] <= 40 * 0.9 for r in ranked)


@pytest.mark.slow
@pytest.mark.parametrize("options", [[], ["--no-sequence-parallel", "--headroom", "0.05"]], ids=["all", "2022-options"])
def test_search_for_bloom_176b_ranks_its_layout_or_explains(options, capsys):
    """All knobs: faster layouts drop recompute thanks to sequence parallelism, and the output
    says why. With the options Megatron-DeepSpeed had in 2022 (no sequence parallelism) and 5%
    headroom, BLOOM's own layout is among the top three."""
    assert plan_cli.main([*BLOOM_176B, "--search", "--top", "5", *options]) == 0
    out = capsys.readouterr().out
    rank_line = next(line for line in out.splitlines() if "<- the config's layout" in line)
    rank = int(rank_line.split()[0])
    if options:
        assert rank <= 3, out
    if rank > 1:
        assert f"the config's layout ranks {rank} of" in out and "faster because:" in out


def test_gemm_efficiency_follows_shape():
    """Large aligned products run near the device's best matmul fraction (A100: MAMF 267.9 of 312
    TFLOP/s); a partial last wave and skinny products (memory-bound) cost more."""
    from megatron.planning import hardware
    from megatron.planning.timing import gemm_efficiency, gemm_seconds

    a100 = hardware.device("a100-80gb")
    big = gemm_efficiency(8192, 16384, 8192, a100)
    assert 0.9 * 267.9 / 312 <= big <= 267.9 / 312
    # 109 tiles on 108 SMs: a second wave with one tile in it.
    assert gemm_efficiency(256 * 109, 128, 4096, a100) < 0.6 * big
    # A matrix-vector-like product moves its weights once per few FLOPs: HBM, not tensor cores.
    skinny = gemm_seconds(8, 14336, 14336, a100)
    assert skinny > 2 * (2 * 8 * 14336 * 14336) / (312e12 * big)


def test_omnipath_bandwidth_is_jean_zays_measured_all_reduce():
    """BigScience's all_reduce_bench on 4 Jean Zay A100 nodes (experiments/bandwidth, January
    2022): 4e9 bytes of fp32 over 32 ranks in 1.529 s, every node's share through one 100 Gb/s
    NIC. The planner's Omni-Path node delivers that per NIC, four NICs together."""
    from megatron.planning import hardware

    busbw = 4e9 / 1.529 * 2 * (32 - 1) / 32
    cluster = hardware.Cluster(hardware.device("a100-80gb"), 48, 8, hardware.NETWORKS["omnipath-4x100"],
                               network_efficiency=hardware.NETWORK_EFFICIENCIES["omnipath-4x100"])
    assert cluster.inter_node_bus_bandwidth == pytest.approx(4 * busbw, rel=0.01)
    assert hardware.NETWORK_EFFICIENCIES["ib-hdr-8x200"] == hardware.NETWORK_EFFICIENCY


def test_layout_knobs_move_memory_the_right_way():
    from megatron.config import load_config
    from megatron.planning import hardware
    from megatron.training.memory import estimate_memory

    h100 = hardware.device("h100")

    def peak(*overrides, world=8):
        cfg = load_config(CONFIGS / "bloom-7b1.yaml", list(overrides))
        return max(st.total for st in estimate_memory(cfg, world, h100))

    base = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=1"]
    assert peak(*base, "training.checkpoint_activations=false") > peak(*base)
    assert peak(*base, "training.checkpoint_activations=false", "parallel.sequence_parallel=true") < \
        peak(*base, "training.checkpoint_activations=false")
    assert peak(*base, "parallel.zero_stage=2") < peak(*base)
    assert peak(*base, world=2) > peak(*base, world=8)  # ZeRO shards the optimizer over DP
