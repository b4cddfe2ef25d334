"""3D parallelism equals one process: TP x PP x DP layouts, sequence parallelism, activation
checkpointing and ZeRO stages give the losses and final weights of the (1, 1, 1) run (fp32)."""

from __future__ import annotations

import pytest
import torch

from launch import run_ranks
from megatron.config import config_from_dict
from megatron.model.pipeline import pipeline_to_model_name
from megatron.training.logging import read_metrics
from training_utils import synthetic_corpus, tiny_run

pytestmark = pytest.mark.distributed
STEPS = 10


def save_local_weights(path, num_layers: int):
    """An ``on_finish`` hook: write this rank's parameters with their TP/PP coordinates."""

    def hook(engine, parallel):
        pipelined = parallel.pp_size > 1
        weights = {}
        for name, param in engine.module.named_parameters():
            if pipelined and name.startswith("tied_modules.") and not parallel.is_pipeline_first_stage():
                continue  # the head's copy of the embedding module: its LayerNorm is unused there
            full_name = pipeline_to_model_name(name, num_layers) if pipelined else name
            weights[full_name] = (param.detach().float().clone(), getattr(param, "tensor_model_parallel", False),
                                  getattr(param, "partition_dim", -1))
        torch.save({"tp_rank": parallel.tp_rank, "dp_rank": parallel.dp_rank, "weights": weights},
                   f"{path}/rank{torch.distributed.get_rank()}.pt")

    return hook


def worker(rank: int, body: dict, out_dir: str) -> None:
    from megatron.training.trainer import pretrain

    pretrain(config_from_dict(body), on_finish=save_local_weights(out_dir, body["model"]["num_layers"]))


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


def run(tmp_path, corpus, tp, pp, dp, **sections):
    sections.setdefault("parallel", {}).update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    sections.setdefault("training", {}).update(train_iters=STEPS)
    sections.setdefault("logging", {}).update(eval_interval=0)
    body = tiny_run(tmp_path, corpus, **sections)
    world = tp * pp * dp
    run_ranks(worker, world, (body, str(tmp_path)), timeout=600)
    losses = [r["lm loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    return losses, gathered_weights(tmp_path, world)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synthetic_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    return run(tmp_path_factory.mktemp("ref"), corpus, 1, 1, 1)


LAYOUTS = [
    pytest.param((2, 1, 1), {}, id="tp2"),
    pytest.param((1, 2, 1), {}, id="pp2"),
    pytest.param((1, 1, 2), {}, id="dp2"),
    pytest.param((2, 2, 1), {}, id="tp2-pp2"),
    pytest.param((2, 1, 2), {}, id="tp2-dp2"),
    pytest.param((1, 2, 2), {}, id="pp2-dp2"),
    pytest.param((2, 2, 2), {}, id="tp2-pp2-dp2"),
    pytest.param((2, 1, 1), {"parallel": {"sequence_parallel": True}}, id="tp2-sp"),
    pytest.param((2, 2, 1), {"parallel": {"sequence_parallel": True},
                             "training": {"checkpoint_activations": True}}, id="tp2-pp2-sp-recompute"),
    pytest.param((1, 1, 1), {"training": {"checkpoint_activations": True}}, id="recompute"),
    pytest.param((1, 2, 1), {"training": {"checkpoint_activations": True}}, id="pp2-recompute"),
    pytest.param((2, 1, 2), {"parallel": {"zero_stage": 2}}, id="tp2-dp2-zero2"),
    pytest.param((1, 1, 2), {"parallel": {"zero_stage": 3}}, id="dp2-zero3"),
]


@pytest.mark.parametrize("layout, sections", LAYOUTS)
def test_layout_matches_single_process(layout, sections, corpus, reference, tmp_path):
    ref_losses, ref_weights = reference
    losses, weights = run(tmp_path, corpus, *layout, **sections)
    assert len(losses) == len(ref_losses) == STEPS
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) <= 1e-5, (losses, ref_losses)
    assert set(weights) == set(ref_weights)
    for name, tensor in ref_weights.items():
        assert (weights[name] - tensor).abs().max().item() <= 1e-5, name
