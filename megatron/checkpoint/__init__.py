"""Checkpoints in Megatron-DeepSpeed's layout: atomic saves, exact resumes, resharding on load.

* ``checkpointing``: :class:`Checkpointer`, the save / find / convert / load sequence a run uses;
* ``store``: the directory on disk (atomic commit, manifest checks, ``latest``, retention);
* ``layout``: file and parameter names (BLOOM's pipeline layer indices);
* ``rng``: every random stream of every rank;
* ``universal``: conversion to DeepSpeed's universal checkpoint for another TP/PP/DP layout.
"""

from megatron.checkpoint.checkpointing import Checkpointer, LoadedCheckpoint, ResumePoint
from megatron.checkpoint.store import CheckpointInfo, CheckpointStore, verify_checkpoint

__all__ = ["Checkpointer", "LoadedCheckpoint", "ResumePoint", "CheckpointInfo", "CheckpointStore",
           "verify_checkpoint"]
