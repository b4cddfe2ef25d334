"""Checkpoints in Megatron-DeepSpeed's layout: atomic saves, exact resumes, resharding on load.

* ``checkpointing``: :class:`Checkpointer`, the save / find / convert / load sequence a run uses;
* ``store``: the directory on disk (atomic commit, manifest checks, ``latest``, retention);
* ``layout``: the names of checkpoint folders and files;
* ``layer_files``: reading and writing ``layer_XX-model_YY-model_states.pt``, filling modules from them;
* ``resharding``: merging and splitting tensor-parallel shards of layer-file tensors;
* ``rng``: every random stream of every rank;
* ``universal``: conversion to DeepSpeed's universal checkpoint for another TP/PP/DP layout.
"""

from megatron.checkpoint.checkpointing import Checkpointer, LoadedCheckpoint, ResumePoint
from megatron.checkpoint.store import CheckpointInfo, CheckpointStore, verify_checkpoint

__all__ = ["Checkpointer", "LoadedCheckpoint", "ResumePoint", "CheckpointInfo", "CheckpointStore",
           "verify_checkpoint"]
