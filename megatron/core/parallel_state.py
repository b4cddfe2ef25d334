"""Process groups for tensor (TP), pipeline (PP) and data (DP) parallelism, in one object.

Ranks are laid out as Megatron-DeepSpeed lays them out, PP outermost, DP in the middle, TP
innermost::

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

TP ranks are therefore neighbours (on one node: TP traffic is the heaviest and needs NVLink),
and the layout is exactly DeepSpeed's ``PipeModelDataParallelTopology(num_pp=pp, num_mp=tp,
num_dp=dp)`` (axes ``pipe, data, model``). When DeepSpeed's pipeline engine builds its own grid
from that topology, its ``model`` axis is our TP group and its ``data`` axis our DP group.

There is no module-level state: ``ParallelState`` is created once at start-up and passed to
whatever needs a group. Without a pipeline it is also the ``mpu`` handed to
``deepspeed.initialize``; it deliberately has no ``initialize_sequence_parallel`` method, because
DeepSpeed's ZeRO ignores the model-parallel group of an ``mpu`` that has one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch.distributed as dist

ProcessGroup = Any  # torch.distributed.ProcessGroup; None stands for "no group needed" (world of 1)


class RankCoord(NamedTuple):
    """A rank's place in the grid, in DeepSpeed's axis order (pipe, data, model)."""

    pp: int
    dp: int
    tp: int


def validate_layout(num_layers: int, num_attention_heads: int, padded_vocab_size: int, tp: int, pp: int) -> None:
    """Raise ValueError when a model cannot be split ``tp`` ways by tensor and ``pp`` ways by pipeline."""
    if num_attention_heads % tp:
        raise ValueError(f"num_attention_heads ({num_attention_heads}) is not divisible by tensor parallel size "
                         f"{tp}: tensor parallelism gives each rank whole heads; pick a TP size that divides it")
    if padded_vocab_size % tp:
        raise ValueError(f"padded vocabulary size ({padded_vocab_size}) is not divisible by tensor parallel size "
                         f"{tp}: pad the vocabulary to a multiple of {tp} (make_vocab_size_divisible_by x TP)")
    if num_layers < pp:
        raise ValueError(f"num_layers ({num_layers}) is smaller than the pipeline parallel size {pp}: every "
                         f"stage needs at least one transformer layer; use at most {num_layers} stages")


@dataclass(frozen=True)
class ParallelLayout:
    """The rank arithmetic of a (TP, PP, DP) grid; no processes or groups involved.

    The data-parallel size is derived: ``world_size / (tp * pp)``.
    """

    world_size: int
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for name, value in (("world_size", self.world_size), ("tensor parallel size", self.tp),
                            ("pipeline parallel size", self.pp)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.world_size % (self.tp * self.pp):
            raise ValueError(
                f"world size {self.world_size} is not divisible by tensor parallel size {self.tp} x pipeline "
                f"parallel size {self.pp} = {self.tp * self.pp}, so no data-parallel size d satisfies "
                f"world = TP x PP x d: launch a multiple of {self.tp * self.pp} processes or change TP/PP")

    @property
    def dp(self) -> int:
        """Number of model replicas."""
        return self.world_size // (self.tp * self.pp)

    def coord(self, rank: int) -> RankCoord:
        """(pp, dp, tp) coordinates of ``rank``; equal to DeepSpeed's ``topology.get_coord(rank)``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size} processes")
        return RankCoord(pp=rank // (self.dp * self.tp), dp=rank // self.tp % self.dp, tp=rank % self.tp)

    def rank(self, pp: int, dp: int, tp: int) -> int:
        """The global rank at coordinates (pp, dp, tp)."""
        return pp * self.dp * self.tp + dp * self.tp + tp

    def tensor_parallel_groups(self) -> list[list[int]]:
        """Ranks that differ only in their TP coordinate (one list per (pp, dp))."""
        return [[self.rank(p, d, t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def data_parallel_groups(self) -> list[list[int]]:
        """Ranks that differ only in their DP coordinate (one list per (pp, tp))."""
        return [[self.rank(p, d, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def pipeline_parallel_groups(self) -> list[list[int]]:
        """Ranks that differ only in their PP coordinate (one list per (dp, tp))."""
        return [[self.rank(p, d, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    def model_parallel_groups(self) -> list[list[int]]:
        """TP x PP: every rank holding a piece of one model replica (one list per dp)."""
        return [sorted(self.rank(p, d, t) for p in range(self.pp) for t in range(self.tp)) for d in range(self.dp)]

    def embedding_groups(self) -> list[list[int]]:
        """First and last pipeline stage of each (dp, tp): the ranks holding the tied embedding."""
        return [sorted({ranks[0], ranks[-1]}) for ranks in self.pipeline_parallel_groups()]


def _new_groups(rank_lists: list[list[int]], rank: int) -> tuple[ProcessGroup, list[int]]:
    """Create one group per list and return the one containing ``rank`` (and its members).

    ``dist.new_group`` is collective over the whole world: every rank must call it for every
    group, including groups it is not in, and in the same order, because groups are numbered by
    call order and their rendezvous keys derive from that number. A rank that skipped a call
    would pair its next group with a different group on the other ranks and hang or mix traffic.
    """
    mine: Optional[tuple[ProcessGroup, list[int]]] = None
    for ranks in rank_lists:
        group = dist.new_group(ranks=ranks)
        if rank in ranks:
            mine = (group, ranks)
    assert mine is not None, f"rank {rank} is in none of {rank_lists}"
    return mine


class ParallelState:
    """This rank's TP, PP and DP groups and coordinates; also DeepSpeed's ``mpu`` when PP = 1.

    ``ParallelState(world_size, rank, tp, pp)`` must be called by every rank, after
    ``torch.distributed`` is initialised (a world of one needs no initialisation). With PP = 1
    the model-parallel group is the TP group; with PP > 1 it spans TP x PP, as in Megatron and in
    DeepSpeed's pipeline grid.
    """

    def __init__(self, world_size: int, rank: int, tp: int = 1, pp: int = 1):
        self.layout = ParallelLayout(world_size, tp, pp)
        self.rank = rank
        self.coord = self.layout.coord(rank)
        if dist.is_initialized() and (dist.get_world_size(), dist.get_rank()) != (world_size, rank):
            raise ValueError(f"ParallelState(world_size={world_size}, rank={rank}) does not match torch.distributed "
                             f"(world size {dist.get_world_size()}, rank {dist.get_rank()}): pass those values")
        if world_size == 1:
            # Every group is the whole (one-process) world; no new_group calls are needed.
            whole = (dist.group.WORLD if dist.is_initialized() else None, [0])
            self._tp = self._dp = self._pp = self._mp = self._embedding = whole
            return
        if not dist.is_initialized():
            raise ValueError(f"a world of {world_size} processes needs torch.distributed initialised before "
                             "ParallelState is created (see megatron.core.distributed.init_distributed)")
        self._tp = _new_groups(self.layout.tensor_parallel_groups(), rank)
        self._dp = _new_groups(self.layout.data_parallel_groups(), rank)
        self._pp = _new_groups(self.layout.pipeline_parallel_groups(), rank)
        # Both only differ from groups above when there is a pipeline; skipping them otherwise is
        # safe because every rank takes the same branch.
        self._mp = _new_groups(self.layout.model_parallel_groups(), rank) if pp > 1 else self._tp
        self._embedding = _new_groups(self.layout.embedding_groups(), rank) if pp > 1 else self._pp

    @classmethod
    def single(cls) -> "ParallelState":
        """A world of one process: every group has size one."""
        return cls(1, 0, 1, 1)

    @classmethod
    def from_world(cls, tp: int = 1, pp: int = 1) -> "ParallelState":
        """Build from the initialised ``torch.distributed`` world (or a world of one if not initialised)."""
        if not dist.is_initialized():
            return cls(1, 0, tp, pp)
        return cls(dist.get_world_size(), dist.get_rank(), tp, pp)

    def __repr__(self) -> str:
        c = self.coord
        return (f"ParallelState(rank={self.rank}/{self.layout.world_size}, tp={c.tp}/{self.layout.tp}, "
                f"pp={c.pp}/{self.layout.pp}, dp={c.dp}/{self.layout.dp})")

    # Sizes, coordinates and groups under short names, for our own code.
    @property
    def tp_size(self) -> int:
        """Tensor-parallel size."""
        return self.layout.tp

    @property
    def pp_size(self) -> int:
        """Number of pipeline stages."""
        return self.layout.pp

    @property
    def dp_size(self) -> int:
        """Number of model replicas."""
        return self.layout.dp

    @property
    def tp_enabled(self) -> bool:
        """Whether tensors are split over more than one rank."""
        return self.layout.tp > 1

    @property
    def pp_enabled(self) -> bool:
        """Whether the model is split into more than one pipeline stage."""
        return self.layout.pp > 1

    @property
    def dp_enabled(self) -> bool:
        """Whether there is more than one model replica."""
        return self.layout.dp > 1

    @property
    def tp_rank(self) -> int:
        """This rank's place in its TP group."""
        return self.coord.tp

    @property
    def pp_rank(self) -> int:
        """This rank's pipeline stage."""
        return self.coord.pp

    @property
    def dp_rank(self) -> int:
        """This rank's replica index."""
        return self.coord.dp

    @property
    def tp_group(self) -> ProcessGroup:
        """Ranks holding the other shards of this rank's tensors."""
        return self._tp[0]

    @property
    def tp_group_or_none(self) -> Optional[ProcessGroup]:
        """The TP group when there is tensor parallelism, else None: the ``tp_group`` argument of the
        model's layers and of ``language_model_loss``, for which None means "no TP"."""
        return self._tp[0] if self.tp_enabled else None

    @property
    def dp_group(self) -> ProcessGroup:
        """Ranks holding the same shard in the other replicas (gradient all-reduce)."""
        return self._dp[0]

    @property
    def pp_group(self) -> ProcessGroup:
        """Ranks holding the other stages of this rank's replica."""
        return self._pp[0]

    @property
    def tp_ranks(self) -> list[int]:
        """Global ranks of this rank's TP group, in TP-rank order."""
        return list(self._tp[1])

    @property
    def dp_ranks(self) -> list[int]:
        """Global ranks of this rank's DP group, in DP-rank order."""
        return list(self._dp[1])

    @property
    def pp_ranks(self) -> list[int]:
        """Global ranks of this rank's pipeline, stage 0 first."""
        return list(self._pp[1])

    def is_pipeline_first_stage(self) -> bool:
        """Whether this stage holds the embedding."""
        return self.coord.pp == 0

    def is_pipeline_last_stage(self) -> bool:
        """Whether this stage holds the final LayerNorm, the LM head and the loss."""
        return self.coord.pp == self.layout.pp - 1

    def get_embedding_group(self) -> ProcessGroup:
        """First and last stage of this pipeline (same TP/DP coordinates): the tied embedding's holders."""
        return self._embedding[0]

    def is_in_embedding_group(self) -> bool:
        """Whether this rank holds a copy of the tied embedding."""
        return self.rank in self._embedding[1]

    def deepspeed_topology(self):
        """DeepSpeed's topology object for the same grid, for ``PipelineModule(topology=...)``."""
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        return PipeModelDataParallelTopology(num_pp=self.layout.pp, num_mp=self.layout.tp, num_dp=self.layout.dp)

    # The mpu interface DeepSpeed's engine and ZeRO call (no pipeline; see the module docstring).
    def get_data_parallel_group(self) -> ProcessGroup:
        """mpu: the group gradients are averaged over."""
        return self._dp[0]

    def get_data_parallel_rank(self) -> int:
        """mpu: rank in the DP group."""
        return self.coord.dp

    def get_data_parallel_world_size(self) -> int:
        """mpu: size of the DP group."""
        return self.layout.dp

    def get_data_parallel_group_ranks(self) -> list[int]:
        """mpu: global ranks of the DP group."""
        return self.dp_ranks

    def get_model_parallel_group(self) -> ProcessGroup:
        """mpu: TP x PP, the ranks of one replica (ZeRO reduces overflow flags and norms over it)."""
        return self._mp[0]

    def get_model_parallel_rank(self) -> int:
        """mpu: rank in the model-parallel group (the TP rank when PP = 1)."""
        return self._mp[1].index(self.rank)

    def get_model_parallel_world_size(self) -> int:
        """mpu: size of the model-parallel group (TP x PP)."""
        return len(self._mp[1])

    def get_tensor_model_parallel_group(self) -> ProcessGroup:
        """mpu: the TP group."""
        return self._tp[0]

    def get_tensor_model_parallel_rank(self) -> int:
        """mpu: rank in the TP group."""
        return self.coord.tp

    def get_tensor_model_parallel_world_size(self) -> int:
        """mpu: size of the TP group."""
        return self.layout.tp

    def get_tensor_model_parallel_src_rank(self) -> int:
        """mpu: global rank of TP rank 0 in this rank's TP group (the source of TP broadcasts)."""
        return self._tp[1][0]

    def get_pipeline_model_parallel_group(self) -> ProcessGroup:
        """mpu: the ranks of this replica's pipeline."""
        return self._pp[0]

    def get_pipeline_model_parallel_rank(self) -> int:
        """mpu: pipeline stage."""
        return self.coord.pp

    def get_pipeline_model_parallel_world_size(self) -> int:
        """mpu: number of pipeline stages."""
        return self.layout.pp
