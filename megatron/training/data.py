"""The trainer's view of the data: a resumable training loader and the validation loaders.

Builds the per-language blend from ``cfg.data`` (see megatron.data.blend_builder) and the
tokenizer. Validation always reads the same first samples of each validation set, so the
curves of successive evaluations (and of different runs) are comparable.
"""

from __future__ import annotations

import itertools
import signal
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from megatron.config import Config
from megatron.core.parallel_state import ParallelState
from megatron.data.blend_builder import build_blended_datasets
from megatron.data.check import check_data, format_problems
from megatron.data.sampler import build_data_loader
from megatron.data.tokenizer import load_tokenizer
from megatron.errors import DataError
from megatron.training.schedules import BatchSizeRampup, total_train_samples


@dataclass
class TrainingData:
    """Datasets plus where this rank reads from them."""

    cfg: Config
    tokenizer: Any
    datasets: Any  # BlendedDatasets: train, valid, valid_per_language
    dp_rank: int
    dp_size: int

    def _loader(self, dataset: Dataset, consumed_samples: int) -> DataLoader:
        t = self.cfg.training
        loader = build_data_loader(dataset, consumed_samples, t.micro_batch_size, self.dp_rank, self.dp_size,
                                   self.cfg.data.num_workers, t.seed)
        if loader is not None and loader.num_workers > 0:
            loader.worker_init_fn = ignore_stop_signals
        return loader

    def train_loader(self, consumed_samples: int):
        """Micro-batches for this rank, starting after ``consumed_samples`` of the global order."""
        return self._loader(self.datasets.train, consumed_samples)

    @property
    def valid_languages(self) -> list[str]:
        """Languages with a validation set, in the config's order."""
        return list(self.datasets.valid_per_language)

    def valid_batches(self, eval_iters: int) -> dict[str, list[dict[str, torch.Tensor]]]:
        """The first ``eval_iters`` micro-batches of this rank from the blend's validation set
        ("overall") and each language's, in the config's order (fewer when a set is smaller; sets
        too small for one batch are left out)."""
        sets = {"overall": self.datasets.valid, **self.datasets.valid_per_language}
        batches = {}
        for name, dataset in sets.items():
            loader = self._loader(dataset, 0) if dataset is not None and len(dataset) else None
            taken = list(itertools.islice(loader, eval_iters)) if loader is not None else []
            if taken:
                batches[name] = taken
        return batches


def ignore_stop_signals(worker_id: int) -> None:
    """In a loader worker: ignore SIGTERM and SIGUSR1. SLURM signals every process of a job step;
    the training process turns them into a save-and-exit (megatron/training/lifecycle.py), and a
    worker killed by them would crash it first. Workers still stop with the training process."""
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def build_training_data(cfg: Config, parallel: ParallelState) -> TrainingData:
    """Open the tokenizer and every dataset of the blend; index maps are built once and cached."""
    d, t = cfg.data, cfg.training
    if not d.datasets:
        raise DataError("data.datasets is empty: list the preprocessed .bin/.idx prefixes to train on "
                         "(see configs/tiny.yaml and tools/preprocess_data.py)")
    try:
        tokenizer = load_tokenizer(d.tokenizer) if d.tokenizer else None
    except (OSError, ValueError):
        tokenizer = None  # check_data reports it, with every other problem
    problems = check_data(d, tokenizer)  # every missing or mismatched file in one message, not the first only
    if problems:
        raise DataError(format_problems(problems))
    if tokenizer is not None and tokenizer.vocab_size > cfg.padded_vocab_size:
        raise DataError(f"data.tokenizer {d.tokenizer} has {tokenizer.vocab_size} tokens but the model's padded "
                         f"vocabulary is {cfg.padded_vocab_size}: set model.vocab_size to {tokenizer.vocab_size}")
    dp_rank, dp_size = parallel.dp_rank, parallel.dp_size
    train_samples = total_train_samples(t, BatchSizeRampup.from_config(t))
    valid_samples = cfg.logging.eval_iters * t.micro_batch_size * dp_size
    specs = [(s.name, s.prefix, s.weight) for s in d.datasets]
    datasets = build_blended_datasets(specs, cfg.model.seq_length, t.seed, d.split, train_samples, valid_samples,
                                      0, alpha=d.alpha, cache_dir=d.cache_dir)
    return TrainingData(cfg, tokenizer, datasets, dp_rank, dp_size)
