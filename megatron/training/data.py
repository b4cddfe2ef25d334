"""The trainer's view of the data: a resumable training loader and the validation loaders.

Builds the per-language blend from ``cfg.data`` (see megatron.data.blended_dataset) and the
tokenizer. Validation always reads the same first samples of each validation set, so the
curves of successive evaluations (and of different runs) are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron.config import Config
from megatron.core.distributed import DistributedInfo
from megatron.data.blended_dataset import build_blended_datasets
from megatron.data.sampler import build_data_loader
from megatron.data.tokenizer import load_tokenizer
from megatron.training.schedules import BatchSizeRampup, total_train_samples


@dataclass
class TrainingData:
    """Datasets plus where this rank reads from them."""

    cfg: Config
    tokenizer: Any
    datasets: Any  # BlendedDatasets: train, valid, valid_per_language
    dp_rank: int
    dp_size: int

    def _loader(self, dataset, consumed_samples: int):
        t = self.cfg.training
        return build_data_loader(dataset, consumed_samples, t.micro_batch_size, self.dp_rank, self.dp_size,
                                 self.cfg.data.num_workers, t.seed)

    def train_loader(self, consumed_samples: int):
        """Micro-batches for this rank, starting after ``consumed_samples`` of the global order."""
        return self._loader(self.datasets.train, consumed_samples)

    def valid_loaders(self, eval_iters: int) -> dict[str, Any]:
        """``eval_iters`` micro-batches of this rank from the overall and each language's validation set."""
        sets = {"overall": self.datasets.valid, **self.datasets.valid_per_language}
        per_rank = eval_iters * self.cfg.training.micro_batch_size
        loaders = {}
        for name, dataset in sets.items():
            if dataset is None or len(dataset) == 0:
                continue
            loaders[name] = _take(self._loader(dataset, 0), max(1, min(per_rank, len(dataset) // self.dp_size))
                                  // self.cfg.training.micro_batch_size or 1)
        return loaders


def _take(loader, n: int):
    for i, batch in enumerate(loader):
        if i >= n:
            break
        yield batch


def build_training_data(cfg: Config, info: DistributedInfo) -> TrainingData:
    """Open the tokenizer and every dataset of the blend; index maps are built once and cached."""
    d, t = cfg.data, cfg.training
    if not d.datasets:
        raise ValueError("data.datasets is empty: list the preprocessed .bin/.idx prefixes to train on "
                         "(see configs/tiny.yaml and tools/preprocess_data.py)")
    tokenizer = load_tokenizer(d.tokenizer) if d.tokenizer else None
    if tokenizer is not None and tokenizer.vocab_size > cfg.padded_vocab_size:
        raise ValueError(f"tokenizer {d.tokenizer} has {tokenizer.vocab_size} tokens but the model's padded "
                         f"vocabulary is {cfg.padded_vocab_size}: set model.vocab_size to {tokenizer.vocab_size}")
    dp_size = cfg.data_parallel_size(info.world_size)
    dp_rank = info.rank // (cfg.parallel.tensor_model_parallel_size) % dp_size
    train_samples = total_train_samples(t, BatchSizeRampup.from_config(t))
    valid_samples = cfg.logging.eval_iters * t.micro_batch_size * dp_size
    specs = [(s.name, s.prefix, s.weight) for s in d.datasets]
    datasets = build_blended_datasets(specs, cfg.model.seq_length, t.seed, d.split, train_samples, valid_samples,
                                      0, alpha=d.alpha, cache_dir=d.cache_dir)
    return TrainingData(cfg, tokenizer, datasets, dp_rank, dp_size)
