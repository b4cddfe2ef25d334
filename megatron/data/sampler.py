"""Batch samplers that resume exactly from a count of consumed samples, and the DataLoader.

Both samplers walk the dataset in *global micro-batches* of ``micro_batch_size x
data_parallel_size`` indices; data-parallel rank ``r`` takes slice ``[r * mbs, (r + 1) * mbs)``
of each, so the ranks partition every global batch and together see each sample once. The
position in the data is the number of samples consumed by all ranks together, which the
checkpoint stores: a run restarted with ``consumed_samples = k`` yields exactly what the
uninterrupted run yielded after its first ``k`` samples.

The datasets are already shuffled (:class:`~megatron.data.gpt_dataset.GPTDataset` shuffles its
samples), so training uses the sequential :class:`MegatronPretrainingSampler`, as Megatron's
``--dataloader-type single``; :class:`MegatronPretrainingRandomSampler` re-shuffles every epoch
(``cyclic``).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence, Sized

import numpy as np
import torch
from torch.utils.data import DataLoader

__all__ = [
    "MegatronPretrainingSampler",
    "MegatronPretrainingRandomSampler",
    "collate_text",
    "build_data_loader",
]


def _check_layout(total_samples: int, consumed_samples: int, micro_batch_size: int, rank: int, size: int) -> None:
    """Shared argument checks, with the offending value and the fix in each message."""
    if total_samples <= 0:
        raise ValueError(f"sampler: total_samples must be > 0, got {total_samples} (is the dataset empty?)")
    if consumed_samples < 0:
        raise ValueError(f"sampler: consumed_samples must be >= 0, got {consumed_samples}")
    if micro_batch_size <= 0:
        raise ValueError(f"sampler: micro_batch_size must be > 0, got {micro_batch_size}")
    if size <= 0:
        raise ValueError(f"sampler: data_parallel_size must be > 0, got {size}")
    if not 0 <= rank < size:
        raise ValueError(f"sampler: data_parallel_rank must be in [0, {size}), got {rank}")


class MegatronPretrainingSampler:
    """Sequential batch sampler: indices ``consumed_samples, consumed_samples + 1, ...``.

    Yields lists of ``micro_batch_size`` indices for this data-parallel rank. With
    ``drop_last=False`` the final, incomplete global micro-batch is split the same way, so
    later ranks get a shorter or no last batch (as in Megatron; only use it where the caller
    copes with ranks doing different numbers of steps).
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ) -> None:
        _check_layout(total_samples, consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        if consumed_samples > total_samples:
            raise ValueError(
                f"sampler: consumed_samples={consumed_samples} exceeds the dataset's {total_samples} "
                "samples; build the dataset with at least training.train_samples samples"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.drop_last = drop_last
        self._global = micro_batch_size * data_parallel_size

    def _my_slice(self, start: int, stop: int) -> list[int]:
        """This rank's part of the global micro-batch ``[start, stop)``."""
        lo = start + self.data_parallel_rank * self.micro_batch_size
        return list(range(lo, min(lo + self.micro_batch_size, stop)))

    def __len__(self) -> int:
        """Number of batches this rank yields."""
        remaining = self.total_samples - self.consumed_samples
        full, rest = divmod(remaining, self._global)
        tail = 0 if self.drop_last else int(rest > self.data_parallel_rank * self.micro_batch_size)
        return full + tail

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed_samples
        while start + self._global <= self.total_samples:
            yield self._my_slice(start, start + self._global)
            start += self._global
        if not self.drop_last and start < self.total_samples:
            batch = self._my_slice(start, self.total_samples)
            if batch:
                yield batch


class MegatronPretrainingRandomSampler:
    """Batch sampler that reshuffles the dataset every epoch, resumable from consumed samples.

    An epoch covers the first ``active = total - total % (mbs * dp)`` indices (the remainder
    never fits a full global batch) in the order of ``torch.randperm(active)`` drawn from a
    generator seeded with ``seed + epoch``; global micro-batches are consecutive chunks of it.
    ``consumed_samples`` fixes the epoch (``consumed // active``) and the offset in it. Each
    ``iter()`` yields the rest of the current epoch and advances ``consumed_samples``, so
    iterating again continues with the next epoch. Resuming is exact as long as
    ``micro_batch_size x data_parallel_size`` is unchanged.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        seed: int = 0,
    ) -> None:
        _check_layout(total_samples, consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        self._global = micro_batch_size * data_parallel_size
        if total_samples < self._global:
            raise ValueError(
                f"sampler: {total_samples} samples cannot fill one global micro-batch of "
                f"{micro_batch_size} x {data_parallel_size}; use a larger dataset or smaller batch"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.seed = seed
        self.active_samples = total_samples - total_samples % self._global

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (it seeds that epoch's shuffle)."""
        return self.consumed_samples // self.active_samples

    def __len__(self) -> int:
        """Batches left in the current epoch for this rank."""
        return (self.active_samples - self.consumed_samples % self.active_samples) // self._global

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.consumed_samples, self.active_samples)
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        order = torch.randperm(self.active_samples, generator=generator).numpy()
        lo = self.data_parallel_rank * self.micro_batch_size
        # Start at the global batch containing ``offset``; offsets are multiples of the global
        # batch whenever the layout is unchanged, otherwise the partial batch is skipped.
        start = offset - offset % self._global
        if start != offset:
            start += self._global
        for begin in range(start, self.active_samples, self._global):
            self.consumed_samples = epoch * self.active_samples + begin + self._global
            yield order[begin + lo : begin + lo + self.micro_batch_size].tolist()


def collate_text(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack ``{"text": int array of seq_length + 1}`` samples into ``{"text": LongTensor [b, s+1]}``."""
    if not samples:
        raise ValueError("collate_text: empty batch")
    texts = [np.asarray(s["text"]) for s in samples]
    lengths = {len(t) for t in texts}
    if len(lengths) != 1:
        raise ValueError(f"collate_text: samples have different lengths {sorted(lengths)}; all must be seq_length + 1")
    return {"text": torch.from_numpy(np.stack(texts).astype(np.int64, copy=False))}


def build_data_loader(
    dataset: Sized | None,
    consumed_samples: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    num_workers: int,
    seed: int,
    *,
    dataloader_type: str = "single",
    drop_last: bool = True,
) -> DataLoader | None:
    """A DataLoader over ``dataset`` for one data-parallel rank, starting after ``consumed_samples``.

    Args:
        dataset: a map-style dataset of ``{"text": ...}`` samples (None gives None, for a
            disabled split).
        consumed_samples: samples all ranks consumed before (from the checkpoint).
        micro_batch_size, dp_rank, dp_size: batch layout (see the module docstring).
        num_workers: loader worker processes (0 loads in the main process).
        seed: seeds the per-epoch shuffle of ``dataloader_type="cyclic"``; the ``"single"``
            sampler is fully determined by the dataset's own shuffle.
        dataloader_type: ``"single"`` (sequential, Megatron's default) or ``"cyclic"``.
        drop_last: for ``"single"``: drop the incomplete last global micro-batch.

    Batches are ``{"text": LongTensor [micro_batch_size, seq_length + 1]}``.
    """
    if dataset is None:
        return None
    if dataloader_type == "single":
        sampler: Any = MegatronPretrainingSampler(
            len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size, drop_last
        )
    elif dataloader_type == "cyclic":
        sampler = MegatronPretrainingRandomSampler(
            len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size, seed
        )
    else:
        raise ValueError(f"dataloader_type={dataloader_type!r}: use 'single' or 'cyclic'")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_text,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
