"""Samplers resume exactly from consumed samples and partition global batches across DP ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_helpers import InMemoryIndexedDataset, random_docs
from megatron.data.gpt_dataset import GPTDataset
from megatron.data.sampler import (
    MegatronPretrainingRandomSampler,
    MegatronPretrainingSampler,
    build_data_loader,
    collate_text,
)

SAMPLERS = {
    "single": lambda total, consumed, mbs, rank, dp: MegatronPretrainingSampler(total, consumed, mbs, rank, dp),
    "cyclic": lambda total, consumed, mbs, rank, dp: MegatronPretrainingRandomSampler(
        total, consumed, mbs, rank, dp, seed=5
    ),
}


def global_batches(kind, total, consumed, mbs, dp, steps=None):
    """Run every DP rank's sampler side by side; return per step the list of rank batches."""
    iters = [iter(SAMPLERS[kind](total, consumed, mbs, r, dp)) for r in range(dp)]
    out = []
    while steps is None or len(out) < steps:
        try:
            out.append([next(it) for it in iters])
        except StopIteration:
            break
    return out


def test_sequential_sampler_order_matches_megatron():
    # mbs 2 x dp 3: global micro-batch t is indices [6t, 6t + 6), rank r takes [6t + 2r, 6t + 2r + 2)
    assert list(MegatronPretrainingSampler(20, 0, 2, 1, 3)) == [[2, 3], [8, 9], [14, 15]]
    assert list(MegatronPretrainingSampler(20, 6, 2, 0, 3)) == [[6, 7], [12, 13]]
    assert len(MegatronPretrainingSampler(20, 0, 2, 1, 3)) == 3


@pytest.mark.parametrize("kind", ["single", "cyclic"])
@pytest.mark.parametrize("mbs, dp", [(1, 1), (2, 3), (4, 2)])
def test_ranks_partition_each_global_batch(kind, mbs, dp):
    total = 97
    steps = global_batches(kind, total, 0, mbs, dp)
    assert len(steps) == total // (mbs * dp)
    seen = []
    for per_rank in steps:
        assert all(len(b) == mbs for b in per_rank)
        flat = [i for b in per_rank for i in b]
        assert len(set(flat)) == mbs * dp  # no overlap between ranks
        if kind == "single":
            assert flat == list(range(flat[0], flat[0] + mbs * dp))  # contiguous global batch
        seen += flat
    assert len(set(seen)) == len(seen) == (total // (mbs * dp)) * mbs * dp
    assert max(seen) < total


@pytest.mark.parametrize("kind", ["single", "cyclic"])
def test_resume_yields_exact_tail(kind):
    total, mbs, dp = 101, 2, 3
    full = global_batches(kind, total, 0, mbs, dp)
    # (a cyclic sampler resumed at the end of an epoch goes on with the next one: tested below)
    ends = (len(full),) if kind == "single" else ()
    for steps_done in (0, 1, 5, len(full) - 1) + ends:
        resumed = global_batches(kind, total, steps_done * mbs * dp, mbs, dp)
        assert resumed == full[steps_done:], steps_done


def test_random_sampler_epochs_reshuffle_and_resume_across_epochs():
    total, mbs, dp = 40, 2, 2  # 10 global batches per epoch
    sampler = MegatronPretrainingRandomSampler(total, 0, mbs, 0, dp, seed=3)
    epoch0 = list(sampler)
    assert sampler.consumed_samples == 40 and sampler.epoch == 1
    epoch1 = list(sampler)  # iterating again continues with the next epoch
    assert epoch0 != epoch1
    # resuming at the epoch boundary or mid-epoch 1 gives (the tail of) epoch 1
    assert list(MegatronPretrainingRandomSampler(total, 40, mbs, 0, dp, seed=3)) == epoch1
    resumed = MegatronPretrainingRandomSampler(total, 40 + 3 * mbs * dp, mbs, 0, dp, seed=3)
    assert list(resumed) == epoch1[3:]
    # the seed changes the order; the same seed reproduces it
    assert list(MegatronPretrainingRandomSampler(total, 0, mbs, 0, dp, seed=4)) != epoch0
    assert list(MegatronPretrainingRandomSampler(total, 0, mbs, 0, dp, seed=3)) == epoch0
    assert len(MegatronPretrainingRandomSampler(total, 8, mbs, 0, dp, seed=3)) == 8


def test_sequential_sampler_drop_last_false():
    # 10 samples, global micro-batch 4: the last 2 samples go to rank 0; rank 1 gets nothing
    rank0 = MegatronPretrainingSampler(10, 0, 2, 0, 2, drop_last=False)
    rank1 = MegatronPretrainingSampler(10, 0, 2, 1, 2, drop_last=False)
    assert list(rank0) == [[0, 1], [4, 5], [8, 9]] and len(rank0) == 3
    assert list(rank1) == [[2, 3], [6, 7]] and len(rank1) == 2
    assert list(MegatronPretrainingSampler(10, 0, 2, 0, 2)) == [[0, 1], [4, 5]]
    assert list(MegatronPretrainingSampler(10, 10, 2, 0, 2)) == []


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 0, 1, 0, 1), "total_samples"),
        ((10, -1, 1, 0, 1), "consumed_samples"),
        ((10, 11, 1, 0, 1), "exceeds"),
        ((10, 0, 0, 0, 1), "micro_batch_size"),
        ((10, 0, 1, 2, 2), "data_parallel_rank"),
        ((10, 0, 1, 0, 0), "data_parallel_size"),
    ],
)
def test_sampler_validation(args, match):
    with pytest.raises(ValueError, match=match):
        MegatronPretrainingSampler(*args)


def test_random_sampler_needs_one_global_batch():
    with pytest.raises(ValueError, match="cannot fill one global micro-batch"):
        MegatronPretrainingRandomSampler(3, 0, 2, 0, 2)


def test_collate_text():
    batch = collate_text([{"text": np.arange(5, dtype=np.int64)}, {"text": np.arange(5, 10).astype(np.uint16)}])
    assert batch["text"].dtype == torch.long and batch["text"].shape == (2, 5)
    assert batch["text"][1].tolist() == [5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="different lengths"):
        collate_text([{"text": np.arange(5)}, {"text": np.arange(4)}])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_data_loader_batches(tmp_path, num_workers):
    docs = random_docs(seed=0, num_docs=30)
    ds = GPTDataset("train", InMemoryIndexedDataset(docs), np.arange(30), 64, 8, seed=0, cache_dir=tmp_path)
    loaders = [build_data_loader(ds, 8, 2, r, 2, num_workers, seed=0) for r in range(2)]
    batches = [list(loader) for loader in loaders]
    n_steps = (len(ds) - 8) // 4
    assert all(len(b) == n_steps for b in batches)
    for step in range(n_steps):
        for rank in range(2):
            text = batches[rank][step]["text"]
            assert text.dtype == torch.long and text.shape == (2, 9)
            first = 8 + step * 4 + rank * 2
            expected = np.stack([ds[first]["text"], ds[first + 1]["text"]])
            np.testing.assert_array_equal(text.numpy(), expected)
    assert build_data_loader(None, 0, 2, 0, 1, 0, seed=0) is None
    with pytest.raises(ValueError, match="dataloader_type"):
        build_data_loader(ds, 0, 2, 0, 1, 0, seed=0, dataloader_type="random")
