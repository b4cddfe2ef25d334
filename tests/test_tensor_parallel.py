"""Tensor-parallel building blocks equal their single-device twins in forward and backward.

Every distributed check runs in one worker per layout (spawning processes costs more than the
checks), which returns the max abs differences; the tests below assert on them. A twin and its
TP version get the same weights (the TP one takes its shard), the same input and the same
upstream gradient; TP gradients are compared with the twin's gradients sliced the same way.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from launch import run_ranks
from megatron.core.parallel_state import ParallelState
from megatron.core.tensor_parallel import (
    MODEL_PARALLEL_RNG,
    ColumnParallelLinear,
    RNGStatesTracker,
    RowParallelLinear,
    SequenceParallelLayerNorm,
    VocabParallelEmbedding,
    check_tp_duplicates_in_sync,
    default_init_method,
    gather_from_sequence_parallel_region,
    init_from_full,
    initialize_rng,
    model_parallel_seed,
    scatter_to_sequence_parallel_region,
    shard,
    vocab_parallel_cross_entropy,
)

B, S, H, V = 2, 8, 16, 64  # S, H and V divide by TP = 4
FP32_TOL = 1e-6


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def local_of(param: torch.Tensor, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """The part of a twin's tensor that corresponds to TP parameter ``param`` on this rank."""
    return shard(full, param.partition_dim, rank, size) if getattr(param, "tensor_model_parallel", False) else full


@torch.no_grad()
def copy_twin(twin: nn.Module, module: nn.Module, rank: int, size: int) -> None:
    for name, param in module.named_parameters():
        param.copy_(local_of(param, twin.get_parameter(name), rank, size))


def twin_diffs(twin: nn.Module, module: nn.Module, x: torch.Tensor, local_in, local_out, rank: int, size: int,
               group=None) -> dict[str, float]:
    """Run both with upstream gradient g; differences of output, input gradient, parameter gradients."""
    x_twin = x.clone().requires_grad_(x.is_floating_point())
    y_twin = twin(x_twin)
    # Scaled like the gradient of a mean over tokens, so weight gradients are O(1) and the
    # fp32 tolerance measures TP errors rather than rounding of large sums.
    g = torch.randn_like(y_twin) / math.sqrt(y_twin.numel() / y_twin.shape[-1])
    (y_twin * g).sum().backward()
    x_tp = local_in(x).clone().requires_grad_(x.is_floating_point())
    y_tp = module(x_tp)
    (y_tp * local_out(g)).sum().backward()
    diffs = {"out": max_diff(y_tp, local_out(y_twin))}
    if x.is_floating_point():
        diffs["grad_in"] = max_diff(x_tp.grad, local_in(x_twin.grad))
    for name, param in module.named_parameters():
        diffs[f"grad {name}"] = max_diff(param.grad, local_of(param, twin.get_parameter(name).grad, rank, size))
    return diffs


class TPAttention(nn.Module):
    """BloomAttention with column-parallel QKV, this rank's heads and slopes, row-parallel dense."""

    def __init__(self, cfg, group, rank: int, size: int):
        super().__init__()
        from megatron.model.alibi import alibi_slopes_for_rank

        self.heads, self.head_dim = cfg.num_attention_heads // size, cfg.head_dim
        self.query_key_value = ColumnParallelLinear(cfg.hidden_size, 3 * cfg.hidden_size, group)
        self.dense = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, group)
        self.register_buffer("slopes", alibi_slopes_for_rank(cfg.num_attention_heads, rank, size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        from megatron.model.kernels.attention import reference_alibi_attention

        b, s, _ = hidden.shape
        qkv = self.query_key_value(hidden).view(b, s, self.heads, 3, self.head_dim)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
        context = reference_alibi_attention(q, k, v, self.slopes)
        return self.dense(context.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class Shards:
    """How a rank's local tensor relates to the twin's full one."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size

    def full(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def hidden(self, t: torch.Tensor) -> torch.Tensor:
        return shard(t, -1, self.rank, self.size)

    def seq(self, t: torch.Tensor) -> torch.Tensor:
        return shard(t, 1, self.rank, self.size)


def layer_checks(group, r: int, tp: int) -> dict[str, dict[str, float]]:
    from megatron.config import ModelConfig
    from megatron.model.bloom import BloomAttention
    from megatron.model.kernels import select_kernels

    on = Shards(r, tp)
    results = {}

    def check(name: str, twin: nn.Module, module: nn.Module, x: torch.Tensor, local_in, local_out) -> None:
        copy_twin(twin, module, r, tp)
        results[name] = twin_diffs(twin, module, x, local_in, local_out, r, tp, group)

    def mlp(column: nn.Module, row: nn.Module, norm: nn.Module = None) -> nn.Sequential:
        return nn.Sequential(norm or nn.LayerNorm(H), column, nn.GELU("tanh"), row)

    torch.manual_seed(0)  # the same twins, inputs and upstream gradients on every rank
    x = torch.randn(B, S, H)
    for gather in (False, True):
        twin, layer = nn.Linear(H, 2 * H), ColumnParallelLinear(H, 2 * H, group, gather_output=gather)
        init_from_full(layer, twin.weight, twin.bias)
        results[f"column gather_output={gather}"] = twin_diffs(twin, layer, x, on.full,
                                                               on.full if gather else on.hidden, r, tp)
    for parallel_in in (True, False):
        check(f"row input_is_parallel={parallel_in}", nn.Linear(2 * H, H),
              RowParallelLinear(2 * H, H, group, input_is_parallel=parallel_in), torch.randn(B, S, 2 * H),
              on.hidden if parallel_in else on.full, on.full)
    check("mlp", mlp(nn.Linear(H, 4 * H), nn.Linear(4 * H, H)),
          mlp(ColumnParallelLinear(H, 4 * H, group), RowParallelLinear(4 * H, H, group)), x, on.full, on.full)
    sp_mlp = mlp(ColumnParallelLinear(H, 4 * H, group, sequence_parallel=True),
                 RowParallelLinear(4 * H, H, group, sequence_parallel=True),
                 SequenceParallelLayerNorm(H, group=group, sequence_parallel=True))
    check("mlp sequence_parallel", mlp(nn.Linear(H, 4 * H), nn.Linear(4 * H, H)), sp_mlp, x, on.seq, on.seq)
    ids = torch.randint(0, V, (B, S))
    check("embedding", nn.Embedding(V, H), VocabParallelEmbedding(V, H, group), ids, on.full, on.full)
    check("embedding sequence_parallel", nn.Embedding(V, H),
          VocabParallelEmbedding(V, H, group, sequence_parallel=True), ids, on.full, on.seq)
    cfg = ModelConfig(hidden_size=48, num_attention_heads=12, use_fused_kernels=False)  # 12: not a power of 2
    check("attention", BloomAttention(cfg, select_kernels(cfg, "cpu")), TPAttention(cfg, group, r, tp), torch.randn(B, S, 48), on.full, on.full)
    return results


def cross_entropy_checks(group, r: int, tp: int) -> dict[str, dict[str, float]]:
    """Differences from F.cross_entropy on the full fp32 logits, and the dtypes of loss and gradient."""
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(2)
        logits, labels = (torch.randn(B * S, V) * 4).to(dtype), torch.randint(0, V, (B * S,))
        weights = torch.rand(B * S)
        twin_logits = logits.clone().requires_grad_()
        expected = F.cross_entropy(twin_logits.float(), labels, reduction="none")
        (expected * weights).sum().backward()
        local = shard(logits, -1, r, tp).clone().requires_grad_()
        losses = vocab_parallel_cross_entropy(local, labels, group)
        (losses * weights).sum().backward()
        results[f"cross entropy {dtype}"] = {
            "out": max_diff(losses, expected), "grad_in": max_diff(local.grad, shard(twin_logits.grad, -1, r, tp))}
        results[f"cross entropy dtypes {dtype}"] = (str(losses.dtype), str(local.grad.dtype))
    return results


def sequence_round_trips(group, tp: int) -> dict[str, tuple[float, float]]:
    """scatter then gather is the identity; the gradient comes back whole (or summed over TP)."""
    torch.manual_seed(3)
    x, g = torch.randn(B, S, H, requires_grad=True), torch.randn(B, S, H)
    found = {}
    for reduce_grad in (False, True):
        y = gather_from_sequence_parallel_region(scatter_to_sequence_parallel_region(x, group), group,
                                                 tensor_parallel_output_grad=reduce_grad)
        (y * g).sum().backward()
        found[f"reduce_grad={reduce_grad}"] = (max_diff(y, x), max_diff(x.grad, g * (tp if reduce_grad else 1)))
        x.grad = None
    return found


def duplicate_checks(group, r: int, tp: int) -> dict[str, list[str]]:
    torch.manual_seed(4)
    block = nn.Sequential(nn.LayerNorm(H), ColumnParallelLinear(H, 2 * H, group), RowParallelLinear(2 * H, H, group))
    found = {"in sync": check_tp_duplicates_in_sync(block, group)}
    with torch.no_grad():
        if r == 1:
            block[0].weight[0] += 1e-3
        if r == tp - 1:
            block[2].bias[-1] = -0.0  # was +0.0: equal by value, different bits
    found["perturbed"] = check_tp_duplicates_in_sync(block, group)
    return found


def seeded_init_checks(group, r: int, tp: int) -> dict[str, bool]:
    """Each rank draws the full master weight from the same seed and keeps its slice."""
    init = default_init_method(0.02)
    layers = {"column": (lambda: ColumnParallelLinear(H, 2 * H, group, init_method=init), (2 * H, H), 0),
              "row": (lambda: RowParallelLinear(2 * H, H, group, init_method=init), (H, 2 * H), 1),
              "embedding": (lambda: VocabParallelEmbedding(V, H, group, init_method=init), (V, H), 0)}
    found = {}
    for name, (make, shape, dim) in layers.items():
        torch.manual_seed(7)
        master = torch.empty(shape)
        init(master)
        torch.manual_seed(7)
        found[name] = torch.equal(make().weight, shard(master, dim, r, tp))
    return found


def dropout_masks(state: ParallelState) -> list:
    """Every rank's dropout mask drawn outside and inside ``fork`` (as lists: tensors die with the worker)."""
    tracker = initialize_rng(1234, state.tp_rank, state.pp_rank, device="cpu")
    outside = F.dropout(torch.ones(256), 0.5)
    with tracker.fork():
        inside = F.dropout(torch.ones(256), 0.5)
    masks = [torch.empty(2, 256) for _ in range(state.layout.world_size)]
    dist.all_gather(masks, torch.stack([outside, inside]))
    return torch.stack(masks).tolist()


def tp_worker(rank: int, tp: int) -> dict:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    state = ParallelState(world, rank, tp=tp, pp=world // tp)
    group, r = state.tp_group, state.tp_rank
    found = {"layers": {**layer_checks(group, r, tp), **cross_entropy_checks(group, r, tp)},
             "round_trips": sequence_round_trips(group, tp), "duplicates": duplicate_checks(group, r, tp),
             "seeded": seeded_init_checks(group, r, tp), "masks": dropout_masks(state), "tp_ranks": state.tp_ranks}
    dist.barrier()
    dist.destroy_process_group()
    return found


@pytest.fixture(scope="module", params=[(2, 2), (4, 2), (4, 4)], ids=["world2-tp2", "world4-tp2-pp2", "world4-tp4"])
def distributed(request):
    world, tp = request.param
    return tp, run_ranks(tp_worker, world, (tp,))


LAYER_CHECKS = ["column gather_output=False", "column gather_output=True", "row input_is_parallel=True",
                "row input_is_parallel=False", "mlp", "mlp sequence_parallel", "embedding",
                "embedding sequence_parallel", "attention", "cross entropy torch.float32"]


@pytest.mark.distributed
@pytest.mark.parametrize("name", LAYER_CHECKS)
def test_layer_matches_single_device_twin(distributed, name):
    _, results = distributed
    for rank, result in enumerate(results):
        diffs = result["layers"][name]
        assert len(diffs) >= 2 and max(diffs.values()) <= FP32_TOL, (rank, diffs)


@pytest.mark.distributed
def test_cross_entropy_on_bf16_logits(distributed):
    _, results = distributed
    for result in results:
        diffs = result["layers"]["cross entropy torch.bfloat16"]
        assert result["layers"]["cross entropy dtypes torch.bfloat16"] == ("torch.float32", "torch.bfloat16")
        assert result["layers"]["cross entropy dtypes torch.float32"] == ("torch.float32", "torch.float32")
        assert diffs["out"] <= 1e-5  # both in fp32 from the same bf16 values
        assert diffs["grad_in"] <= 2 ** -8  # one bf16 rounding of values below 1


@pytest.mark.distributed
def test_sequence_parallel_mappings_are_conjugate(distributed):
    _, results = distributed
    for result in results:
        for forward, backward in result["round_trips"].values():
            assert forward == 0.0 and backward <= FP32_TOL


@pytest.mark.distributed
def test_check_tp_duplicates_finds_drift(distributed):
    _, results = distributed
    for result in results:
        assert result["duplicates"] == {"in sync": [], "perturbed": ["0.weight", "2.bias"]}


@pytest.mark.distributed
def test_seeded_init_is_the_slice_of_the_single_device_init(distributed):
    """Each rank draws the full master weight from the same seed and keeps its slice."""
    _, results = distributed
    for result in results:
        assert result["seeded"] == {"column": True, "row": True, "embedding": True}


@pytest.mark.distributed
def test_dropout_masks_differ_inside_tp_regions_and_agree_outside(distributed):
    _, results = distributed
    for result in results:
        masks = torch.tensor(result["masks"])[result["tp_ranks"]]  # [tp, (outside, inside), 256]
        assert all(torch.equal(masks[0, 0], m) for m in masks[:, 0])
        assert all(not torch.equal(masks[0, 1], m) for m in masks[1:, 1])


# Single-process checks: with no group every piece is its plain PyTorch self.

def test_no_group_layers_are_plain_layers():
    torch.manual_seed(0)
    twin, x = nn.Linear(H, 2 * H), torch.randn(B, S, H)
    for layer in (ColumnParallelLinear(H, 2 * H, gather_output=True),
                  RowParallelLinear(H, 2 * H, input_is_parallel=False)):
        init_from_full(layer, twin.weight, twin.bias)
        assert torch.equal(layer(x), twin(x))
    logits, labels = torch.randn(B * S, V, dtype=torch.bfloat16), torch.randint(0, V, (B * S,))
    expected = F.cross_entropy(logits.float(), labels, reduction="none")
    assert torch.allclose(vocab_parallel_cross_entropy(logits, labels), expected, atol=1e-6)


def test_layers_take_a_parallel_state_for_their_group():
    layer = RowParallelLinear(2 * H, H, ParallelState.single())
    assert (layer.tp_group, layer.tp_rank, layer.tp_size) == (None, 0, 1)


def test_parameters_carry_tensor_parallel_attributes():
    column, row, embedding = ColumnParallelLinear(H, 2 * H), RowParallelLinear(2 * H, H), VocabParallelEmbedding(V, H)
    for param, parallel, dim in ((column.weight, True, 0), (column.bias, True, 0), (row.weight, True, 1),
                                 (row.bias, False, -1), (embedding.weight, True, 0)):
        assert (param.tensor_model_parallel, param.partition_dim, param.partition_stride) == (parallel, dim, 1)
    assert RowParallelLinear(2 * H, H, sequence_parallel=True).bias.sequence_parallel


def test_fused_qkv_split_gives_whole_heads():
    heads, head_dim, tp = 12, 4, 4
    hidden = heads * head_dim
    qkv = torch.randn(3 * hidden, hidden)  # rows laid out [head, (q, k, v), head_dim]
    per_head = qkv.view(heads, 3, head_dim, hidden)
    for rank in range(tp):
        mine = heads // tp
        assert torch.equal(shard(qkv, 0, rank, tp), per_head[rank * mine:(rank + 1) * mine].reshape(-1, hidden))


def test_layers_reject_bad_sizes():
    with pytest.raises(ValueError, match="gather_output=True and sequence_parallel=True"):
        ColumnParallelLinear(H, H, gather_output=True, sequence_parallel=True)
    with pytest.raises(ValueError, match="requires input_is_parallel=True"):
        RowParallelLinear(H, H, input_is_parallel=False, sequence_parallel=True)
    with pytest.raises(ValueError, match="does not fit parameter"):
        init_from_full(ColumnParallelLinear(H, H), torch.zeros(H, H + 1))


def test_model_parallel_seed_follows_megatron():
    assert model_parallel_seed(42, tp_rank=0, pp_rank=0) == (42, 42 + 2718)
    assert model_parallel_seed(42, tp_rank=3, pp_rank=2) == (242, 242 + 2718 + 3)


def test_fork_leaves_the_default_stream_alone():
    tracker = initialize_rng(5, tp_rank=1)
    first = torch.rand(8)
    with tracker.fork():
        forked = torch.rand(8)
    second = torch.rand(8)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(8), first) and torch.equal(torch.rand(8), second)
    torch.manual_seed(model_parallel_seed(5, 1, 0)[1])
    assert torch.equal(torch.rand(8), forked)


def test_rng_states_round_trip():
    tracker = RNGStatesTracker("cpu")
    tracker.add(MODEL_PARALLEL_RNG, 99)
    saved = tracker.get_states()
    with tracker.fork():
        expected = torch.rand(16)
    with tracker.fork():
        assert not torch.equal(torch.rand(16), expected)
    tracker.set_states(saved)
    with tracker.fork():
        assert torch.equal(torch.rand(16), expected)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add(MODEL_PARALLEL_RNG, 100)
    with pytest.raises(KeyError, match="never added"):
        with tracker.fork("other"):
            pass


def _dropout_block(tracker: RNGStatesTracker):
    def block(x: torch.Tensor) -> torch.Tensor:
        with tracker.fork():
            x = F.dropout(x * 2, 0.5)  # inside a TP region: the model-parallel stream
        return F.dropout(x, 0.3).sin()  # outside: the default stream
    return block


@pytest.mark.parametrize("checkpoint", ["none", "tracker", "torch"])
def test_recompute_replays_the_tracker_streams(checkpoint):
    def run(kind: str):
        tracker = initialize_rng(11, tp_rank=1)
        x = torch.randn(64, requires_grad=True)
        block = _dropout_block(tracker)
        if kind == "tracker":
            y = tracker.checkpoint(block, x)
        elif kind == "torch":
            y = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        else:
            y = block(x)
        with tracker.fork():  # a later layer draws from the stream before the backward
            later = torch.rand(4)
        y.sum().backward()
        with tracker.fork():
            after = torch.rand(4)
        return y, x.grad, later, after

    y_ref, grad_ref, later_ref, after_ref = run("none")
    y, grad, later, after = run(checkpoint)
    assert torch.equal(y, y_ref) and torch.equal(later, later_ref)
    # Plain torch checkpointing restores only the default stream: the recompute draws a
    # different model-parallel mask (wrong gradient) and advances the stream a second time.
    replayed = torch.equal(grad, grad_ref) and torch.equal(after, after_ref)
    assert replayed == (checkpoint != "torch")


def test_tp_layers_build_on_meta_device():
    layer = ColumnParallelLinear(H, 2 * H, device="meta")
    assert layer.weight.device.type == "meta" and layer.weight.shape == (2 * H, H)
