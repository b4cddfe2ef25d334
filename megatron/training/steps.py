"""How one training or evaluation batch runs through the engine: two kinds of engine, one interface.

``EngineSteps`` drives a plain DeepSpeed engine (no pipeline): forward with the labels, which
returns the loss (through the LM head + loss the kernel registry chose for the model: on CUDA
without forming the logits), ``backward`` and ``step`` per micro-batch; DeepSpeed accumulates gradients and applies the
update at the accumulation boundary. ``PipelineSteps`` hands the micro-batches to DeepSpeed's
pipeline engine, whose ``train_batch`` runs the 1F1B schedule over all of them and returns the
loss averaged over micro-batches and data-parallel ranks on every stage. On its last stage the
``PipelineModule``'s ``loss_fn`` applies the same LM head + loss to the last layer's output.

Both return the mean loss over the global batch as seen by this rank's data-parallel group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import torch
import torch.distributed as dist

from megatron.core.parallel_state import ParallelState

if TYPE_CHECKING:  # deepspeed is imported where an engine is built, not when this module loads
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe.engine import PipelineEngine


def _split(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    text = batch["text"].to(device)
    return text[:, :-1], text[:, 1:]


class EngineSteps:
    """Micro-batch loop over a non-pipeline engine (TP through the model's layers, DP/ZeRO by DeepSpeed)."""

    def __init__(self, engine: DeepSpeedEngine, parallel: ParallelState, device: torch.device):
        self.engine, self.parallel, self.device = engine, parallel, device

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens, labels = _split(batch, self.device)
        return self.engine(tokens, labels=labels)

    def train(self, batches: Iterator[dict[str, torch.Tensor]]) -> float:
        """One global batch: ``gradient_accumulation_steps`` micro-batches, then the update."""
        losses = []
        for _ in range(self.engine.gradient_accumulation_steps()):
            loss = self._loss(next(batches))
            self.engine.backward(loss)
            self.engine.step()  # applies the update only at the accumulation boundary
            losses.append(loss.detach().float())
        return self._data_parallel_mean(torch.stack(losses).mean())

    @torch.no_grad()
    def evaluate(self, batches: list[dict[str, torch.Tensor]]) -> float:
        """Mean loss over ``batches`` (equal-sized micro-batches), averaged over DP ranks."""
        losses = torch.stack([self._loss(batch).float() for batch in batches])
        return self._data_parallel_mean(losses.mean())

    def _data_parallel_mean(self, value: torch.Tensor) -> float:
        if self.parallel.dp_enabled:
            value = value.clone()
            dist.all_reduce(value, group=self.parallel.dp_group)  # SUM, then divide: the DP mean
            value /= self.parallel.dp_size
        return value.item()


class PipelineSteps:
    """Global batches through DeepSpeed's pipeline engine (1F1B over PP, TP inside the layers)."""

    def __init__(self, engine: PipelineEngine, parallel: ParallelState, device: torch.device):
        self.engine, self.device = engine, device

    def _pairs(self, batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in batches:
            yield _split(batch, self.device)

    def train(self, batches: Iterator[dict[str, torch.Tensor]]) -> float:
        """One global batch; the engine pulls ``gradient_accumulation_steps`` micro-batches."""
        return float(self.engine.train_batch(data_iter=self._pairs(batches)))

    @torch.no_grad()
    def evaluate(self, batches: list[dict[str, torch.Tensor]]) -> float:
        """Mean loss over ``batches`` through the pipeline, broadcast to every stage."""
        loss = self.engine.eval_batch(iter(list(self._pairs(batches))), num_micro_batches=len(batches),
                                      bcast_loss=True)
        return float(loss)
