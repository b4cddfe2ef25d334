"""Checkpoints in Megatron-DeepSpeed's layout: atomic saves, exact resumes, resharding on load.

* ``checkpointing``: :class:`Checkpointer`, the save / find / convert / load sequence a run uses;
* ``store``: the directory on disk (atomic commit, manifest checks, ``latest``, retention);
* ``layout``: the names of checkpoint folders and files;
* ``layer_files``: reading and writing ``layer_XX-model_YY-model_states.pt``, filling modules from them;
* ``resharding``: merging and splitting tensor-parallel shards of layer-file tensors;
* ``rng``: every random stream of every rank;
* ``universal``: DeepSpeed's universal checkpoint for another TP/PP/DP layout: BLOOM's merge rules, completion marker;
* ``universal_conversion``: the streaming, resumable conversion (``tools/convert_checkpoint.py``, in-job resume);
* ``megatron_deepspeed``: checkpoints written by Megatron-DeepSpeed itself (no manifest);
* ``pickle_scan``: the allow-list every checkpoint file's pickle is checked against before it is unpickled.
"""

from megatron.checkpoint.checkpointing import Checkpointer, LoadedCheckpoint, ResumePoint
from megatron.checkpoint.store import CheckpointInfo, CheckpointStore, verify_checkpoint

__all__ = ["Checkpointer", "LoadedCheckpoint", "ResumePoint", "CheckpointInfo", "CheckpointStore",
           "verify_checkpoint"]
