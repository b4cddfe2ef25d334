"""Helpers for training tests: synthetic per-language datasets and tiny run configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron.data.indexed_dataset import IndexedDatasetBuilder
from megatron.model.layout import flat_name
from megatron.training.logging import read_metrics

VOCAB = 256


def write_language(prefix: Path, seed: int, num_docs: int = 60, vocab: int = VOCAB) -> str:
    """A ``.bin/.idx`` pair of documents from a per-language token distribution (learnable)."""
    rng = np.random.default_rng(seed)
    # Each "language" favours its own slice of the vocabulary and repeats short patterns.
    favourite = rng.choice(vocab - 1, size=24, replace=False) + 1
    with IndexedDatasetBuilder(f"{prefix}.bin", np.uint16) as builder:
        for _ in range(num_docs):
            length = int(rng.integers(20, 120))
            pattern = rng.choice(favourite, size=6)
            doc = np.resize(pattern, length)
            noise = rng.random(length) < 0.2
            doc[noise] = rng.integers(1, vocab, noise.sum())
            builder.add_document(np.append(doc, 0))  # 0 plays the end-of-document token
        builder.finalize(f"{prefix}.idx")
    return str(prefix)


def synthetic_corpus(root: Path, languages=("fr", "sw", "python")) -> list[dict[str, Any]]:
    """Three small languages under ``root``; returns ``data.datasets`` entries (no weights)."""
    root.mkdir(parents=True, exist_ok=True)
    return [{"name": lang, "prefix": write_language(root / f"{lang}_text_document", seed=i)}
            for i, lang in enumerate(languages)]


def tiny_run(tmp: Path, datasets: list[dict[str, Any]], **overrides: dict[str, Any]) -> dict[str, Any]:
    """A config dict for a 2-layer model on the synthetic corpus; sections updated by ``overrides``."""
    body: dict[str, Any] = {
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
                  "vocab_size": VOCAB, "init_method_std": 0.02},
        "parallel": {"zero_stage": 1},
        # fp32 pinned: the invariants these runs check (layout equivalence, bit-exact resume) are
        # fp32 ones, whatever the machine's bf16 support.
        "training": {"micro_batch_size": 2, "global_batch_size": 8, "train_iters": 10, "seed": 7, "bf16": False},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "lr_warmup_samples": 16, "lr_decay_style": "cosine",
                      "clip_grad": 1.0},
        "data": {"datasets": datasets, "alpha": 0.5, "split": "0.8,0.2,0", "num_workers": 0},
        "logging": {"log_interval": 1, "eval_interval": 5, "eval_iters": 2, "run_dir": str(tmp / "run")},
        "checkpoint": {},
    }
    for section, values in overrides.items():
        body[section].update(values)
    return body


def save_local_weights(path, num_layers: int):
    """An ``on_finish`` hook: write this rank's parameters with their TP/PP coordinates."""

    def hook(engine, parallel):
        pipelined = parallel.pp_size > 1
        weights = {}
        for name, param in engine.module.named_parameters():
            if pipelined and name.startswith("tied_modules.") and not parallel.is_pipeline_first_stage():
                continue  # the head's copy of the embedding module: its LayerNorm is unused there
            full_name = flat_name(name, num_layers) if pipelined else name
            weights[full_name] = (param.detach().float().clone(), getattr(param, "tensor_model_parallel", False),
                                  getattr(param, "partition_dim", -1))
        torch.save({"tp_rank": parallel.tp_rank, "dp_rank": parallel.dp_rank, "weights": weights},
                   f"{path}/rank{torch.distributed.get_rank()}.pt")

    return hook


def gathered_weights(out_dir, world_size: int) -> dict[str, torch.Tensor]:
    """Merge every rank's shards into single-device tensors (TP: concatenate on partition_dim)."""
    shards: dict[str, dict[int, tuple]] = {}
    for r in range(world_size):
        saved = torch.load(f"{out_dir}/rank{r}.pt", weights_only=False)
        if saved["dp_rank"] != 0:
            continue
        for name, entry in saved["weights"].items():
            shards.setdefault(name, {})[saved["tp_rank"]] = entry
    merged = {}
    for name, by_tp in shards.items():
        tensor, parallel, dim = by_tp[0]
        merged[name] = torch.cat([by_tp[t][0] for t in sorted(by_tp)], dim=dim) if parallel else tensor
        if not parallel:
            for t in by_tp:
                assert torch.equal(by_tp[t][0], tensor), f"{name} differs across TP ranks"
    return merged


def train_losses(run_dir) -> list[float]:
    """The ``lm loss`` of every logged training step of a run, in step order."""
    return [r["lm loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["kind"] == "train"]


def poisoned_worker(rank: int, body: dict, poison_calls: list[int]) -> dict:
    """Train with NaN injected into the output (loss) of the given forward calls (micro-batches)."""
    import megatron.training.trainer as trainer_module
    from megatron.config import config_from_dict
    from megatron.model import bloom
    from megatron.training.pretrain import pretrain

    calls = {"n": 0}
    original = bloom.BloomForCausalLM.forward

    def forward(self, input_ids, *args, **kwargs):
        out = original(self, input_ids, *args, **kwargs)  # the loss when given labels, else the logits
        if self.training:
            calls["n"] += 1
            if calls["n"] in poison_calls:
                out = out * float("nan")
        return out

    bloom.BloomForCausalLM.forward = forward
    try:
        state = pretrain(config_from_dict(body))
        return {"skipped": state.skipped_iterations, "iteration": state.iteration}
    except trainer_module.TooManySkippedSteps as exc:
        return {"error": str(exc)}
