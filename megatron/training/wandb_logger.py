"""Weights & Biases, when ``logging.wandb_project`` is set: the TensorBoard tags, on their axes.

Every scalar goes to W&B under the tag it has in TensorBoard (megatron/training/logging.py:
``lm-loss-training/lm loss``, ``lm-loss-validation/fr/lm loss validation ppl`` ...), so a
dashboard built for one reads the other. TensorBoard's ``... vs samples`` and ``... vs tokens``
series are W&B metrics whose x axis (``define_metric``'s ``step_metric``) is ``samples`` or
``tokens``, logged in the same row; everything else is plotted against the iteration.

W&B's own environment variables are honoured as W&B documents them: ``WANDB_MODE=offline``
writes the run under ``logging.wandb_save_dir`` (default: ``logging.run_dir``) for a later
``wandb sync`` (compute nodes usually have no internet), ``WANDB_API_KEY`` logs in, and so on.
Only rank 0 logs.
"""

from __future__ import annotations

from typing import Any, Optional

SAMPLES_AXIS, TOKENS_AXIS = "samples", "tokens"


def axis_of(tag: str) -> Optional[str]:
    """The x axis of a TensorBoard tag: ``samples``, ``tokens``, or None for the iteration."""
    if tag.endswith(" vs samples") or tag.endswith(",x=samples"):
        return SAMPLES_AXIS
    if tag.endswith(" vs tokens") or tag.endswith(",x=tokens"):
        return TOKENS_AXIS
    return None


class WandbWriter:
    """One W&B run; ``log`` takes what ``tensorboard_scalars`` produced for one record."""

    def __init__(self, project: str, name: Optional[str], save_dir: Optional[str], config: dict[str, Any]):
        import wandb

        self._run = wandb.init(project=project, name=name, dir=save_dir, config=config)
        self._run.define_metric(SAMPLES_AXIS)
        self._run.define_metric(TOKENS_AXIS)
        self._defined: set[str] = set()

    def log(self, step: int, scalars: list[tuple[str, float, int]]) -> None:
        """One row at iteration ``step``: every (tag, value, x) of ``tensorboard_scalars``."""
        row: dict[str, float] = {}
        for tag, value, x in scalars:
            axis = axis_of(tag)
            if axis is not None:
                if tag not in self._defined:
                    self._run.define_metric(tag, step_metric=axis)
                    self._defined.add(tag)
                row[axis] = x
            row[tag] = value
        if row:
            self._run.log(row, step=step)

    def close(self) -> None:
        """Finish the run and wait until W&B's service process has written it: ``finish`` alone
        returns before an offline run's file is complete on disk."""
        import wandb

        self._run.finish()
        wandb.teardown()
