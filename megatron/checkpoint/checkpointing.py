"""Save and resume through DeepSpeed's checkpoint I/O, in Megatron-DeepSpeed's layout.

``{save}/global_step{N}/mp_rank_00_model_states.pt`` (+ ZeRO optimizer shards) and a
``{save}/latest`` file naming the newest tag. The client state carries the loop's progress
and the config, so a resumed run continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron.config import Config


def checkpoint_tag(iteration: int) -> str:
    """Megatron-DeepSpeed's directory name for the checkpoint after ``iteration`` steps."""
    return f"global_step{iteration}"


def save(engine, cfg: Config, train_state: dict[str, Any]) -> None:
    """Write a checkpoint of the engine (model, optimizer) and the loop's state on every rank."""
    client_state = {"train_state": dict(train_state), "config": cfg.to_dict()}
    engine.save_checkpoint(cfg.checkpoint.save, tag=checkpoint_tag(train_state["iteration"]),
                           client_state=client_state)


def load(engine, cfg: Config) -> dict[str, Any]:
    """Resume from ``{load}/latest`` when it exists; returns the saved loop state (empty if none)."""
    directory = cfg.checkpoint.load
    if not directory or not (Path(directory) / "latest").is_file():
        return {}
    path, client_state = engine.load_checkpoint(directory)
    if path is None:
        raise RuntimeError(f"could not load the checkpoint named in {directory}/latest; check the directory")
    return dict(client_state["train_state"])
