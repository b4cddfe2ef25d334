"""ParallelState: the rank layout is DeepSpeed's, the groups have the right members, errors are clear."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from launch import run_ranks
from megatron.core.parallel_state import ParallelLayout, ParallelState, validate_layout

LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 2), (1, 2, 2), (2, 2, 2), (4, 3, 2)]  # (tp, pp, dp)


@pytest.mark.parametrize("tp,pp,dp", LAYOUTS)
def test_coordinates_equal_deepspeed_topology(tp, pp, dp):
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    layout = ParallelLayout(tp * pp * dp, tp, pp)
    assert layout.dp == dp
    for rank in range(layout.world_size):
        coord = layout.coord(rank)
        assert coord == tuple(topology.get_coord(rank))
        assert rank == coord.pp * dp * tp + coord.dp * tp + coord.tp == layout.rank(*coord)


@pytest.mark.parametrize("tp,pp,dp", LAYOUTS)
def test_groups_equal_deepspeed_axes(tp, pp, dp):
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    layout = ParallelLayout(tp * pp * dp, tp, pp)
    assert layout.tensor_parallel_groups() == topology.get_axis_comm_lists("model")
    assert layout.data_parallel_groups() == topology.get_axis_comm_lists("data")
    assert layout.pipeline_parallel_groups() == topology.get_axis_comm_lists("pipe")
    # DeepSpeed's pipeline grid calls "model parallel" every rank of one replica: TP x PP.
    assert layout.model_parallel_groups() == [sorted(topology.get_axis_list("data", d)) for d in range(dp)]
    for ranks, embedding in zip(layout.pipeline_parallel_groups(), layout.embedding_groups()):
        assert embedding == sorted({ranks[0], ranks[-1]})


def test_world_size_must_be_a_multiple_of_tp_times_pp():
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by tensor parallel size 4 x pipeline "
                                         r"parallel size 1 = 4.*launch a multiple of 4 processes"):
        ParallelLayout(6, tp=4, pp=1)
    with pytest.raises(ValueError, match="tensor parallel size must be >= 1, got 0"):
        ParallelLayout(4, tp=0)
    with pytest.raises(ValueError, match="rank 8 is outside the world of 8"):
        ParallelLayout(8, 2, 2).coord(8)


def test_multi_process_state_needs_torch_distributed():
    with pytest.raises(ValueError, match="a world of 2 processes needs torch.distributed initialised"):
        ParallelState(2, 0, tp=2)


def test_validate_layout_names_the_numbers():
    validate_layout(num_layers=70, num_attention_heads=112, padded_vocab_size=250880, tp=4, pp=12)
    with pytest.raises(ValueError, match=r"num_attention_heads \(12\) is not divisible by tensor parallel size 8"):
        validate_layout(4, 12, 256, tp=8, pp=1)
    with pytest.raises(ValueError, match=r"padded vocabulary size \(250\) is not divisible by tensor parallel size 4"):
        validate_layout(4, 16, 250, tp=4, pp=1)
    with pytest.raises(ValueError, match=r"num_layers \(2\) is smaller than the pipeline parallel size 4"):
        validate_layout(2, 16, 256, tp=1, pp=4)


def test_single_process_state():
    state = ParallelState.single()
    assert (state.tp_size, state.pp_size, state.dp_size) == (1, 1, 1)
    assert state.is_pipeline_first_stage() and state.is_pipeline_last_stage() and state.is_in_embedding_group()
    assert state.get_tensor_model_parallel_group() is None  # no group: collectives are skipped
    assert not (state.tp_enabled or state.pp_enabled or state.dp_enabled) and state.tp_group_or_none is None
    assert (state.get_model_parallel_world_size(), state.get_data_parallel_world_size(),
            state.get_pipeline_model_parallel_world_size()) == (1, 1, 1)
    assert not hasattr(state, "initialize_sequence_parallel")  # ZeRO would ignore our model-parallel group


def _members(group, world_size: int) -> list[int]:
    """The global ranks of ``group``, found by summing a one-hot vector over it."""
    one_hot = torch.zeros(world_size)
    one_hot[dist.get_rank()] = 1
    dist.all_reduce(one_hot, group=group)
    return one_hot.nonzero().flatten().tolist()


def groups_worker(rank: int, layouts: list[tuple[int, int]]) -> dict:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    found = {}
    for tp, pp in layouts:
        state = ParallelState(world, rank, tp, pp)
        found[(tp, pp)] = {
            "coord": tuple(state.coord),
            "tp": _members(state.get_tensor_model_parallel_group(), world),
            "dp": _members(state.get_data_parallel_group(), world),
            "pp": _members(state.get_pipeline_model_parallel_group(), world),
            "mp": _members(state.get_model_parallel_group(), world),
            "embedding": _members(state.get_embedding_group(), world),
            "ranks": (state.tp_ranks, state.dp_ranks, state.pp_ranks),
            "mpu": (state.get_tensor_model_parallel_rank(), state.get_tensor_model_parallel_world_size(),
                    state.get_data_parallel_rank(), state.get_data_parallel_world_size(),
                    state.get_pipeline_model_parallel_rank(), state.get_pipeline_model_parallel_world_size(),
                    state.get_model_parallel_rank(), state.get_model_parallel_world_size(),
                    state.get_tensor_model_parallel_src_rank()),
            "stages": (state.is_pipeline_first_stage(), state.is_pipeline_last_stage()),
            "enabled": (state.tp_enabled, state.pp_enabled, state.dp_enabled, state.tp_group_or_none is not None),
        }
    try:
        ParallelState(world, (rank + 1) % world, 2, 1)
        found["mismatch"] = None
    except ValueError as error:
        found["mismatch"] = str(error)
    dist.barrier()
    dist.destroy_process_group()
    return found


@pytest.mark.distributed
def test_group_membership_on_four_ranks():
    layouts = [(2, 2), (2, 1), (1, 2), (4, 1), (1, 1)]
    results = run_ranks(groups_worker, 4, (layouts,))
    for rank, found in enumerate(results):
        for tp, pp in layouts:
            layout, got = ParallelLayout(4, tp, pp), found[(tp, pp)]
            coord = layout.coord(rank)

            def mine(groups: list[list[int]], rank: int = rank) -> list[int]:
                (group,) = [g for g in groups if rank in g]
                return group

            assert got["coord"] == tuple(coord)
            assert got["tp"] == mine(layout.tensor_parallel_groups())
            assert got["dp"] == mine(layout.data_parallel_groups())
            assert got["pp"] == mine(layout.pipeline_parallel_groups())
            assert got["mp"] == mine(layout.model_parallel_groups())
            assert got["embedding"] == mine(layout.embedding_groups())
            assert got["ranks"] == (got["tp"], got["dp"], got["pp"])
            mp_rank = got["mp"].index(rank)
            assert got["mpu"] == (coord.tp, tp, coord.dp, layout.dp, coord.pp, pp, mp_rank, tp * pp, got["tp"][0])
            assert got["stages"] == (coord.pp == 0, coord.pp == pp - 1)
            assert got["enabled"] == (tp > 1, pp > 1, layout.dp > 1, tp > 1)
            if pp == 1:  # without a pipeline, DeepSpeed's "model parallel" is exactly TP
                assert got["mp"] == got["tp"] and mp_rank == coord.tp
        assert "does not match torch.distributed" in found["mismatch"]
