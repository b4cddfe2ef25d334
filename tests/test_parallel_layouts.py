"""3D parallelism equals one process: TP x PP x DP layouts, sequence parallelism, activation
checkpointing and ZeRO stages give the losses and final weights of the (1, 1, 1) run (fp32)."""

from __future__ import annotations

import pytest

from launch import run_ranks
from megatron.config import config_from_dict
from training_utils import gathered_weights, save_local_weights, tiny_run, train_losses

pytestmark = pytest.mark.distributed
STEPS = 10


def worker(rank: int, body: dict, out_dir: str) -> None:
    from megatron.training.pretrain import pretrain

    pretrain(config_from_dict(body), on_finish=save_local_weights(out_dir, body["model"]["num_layers"]))


def fused_head_worker(rank: int, body: dict, out_dir: str) -> None:
    """:func:`worker` with the LM head + loss the registry picks on CUDA (fused_linear), on CPU."""
    import megatron.model.kernels as kernels

    kernels._FUSED_HEAD_DEVICES = ("cuda", "cpu")
    worker(rank, body, out_dir)


def run(tmp_path, corpus, tp, pp, dp, target=worker, **sections):
    sections.setdefault("parallel", {}).update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    sections.setdefault("training", {}).update(train_iters=STEPS)
    sections.setdefault("logging", {}).update(eval_interval=0)
    body = tiny_run(tmp_path, corpus, **sections)
    world = tp * pp * dp
    run_ranks(target, world, (body, str(tmp_path)), timeout=600)
    losses = train_losses(tmp_path / "run")
    return losses, gathered_weights(tmp_path, world)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    return run(tmp_path_factory.mktemp("ref"), corpus, 1, 1, 1)


LAYOUTS = [
    # tp2, pp2 and tp2-pp2 alone run in `make test-slow`: the main suite has them in tp2-pp2-dp2,
    # and tp2 in tp2-sp, pp2 in pp2-recompute (kept within its time on 2 AVX2 cores).
    pytest.param((2, 1, 1), {}, id="tp2", marks=pytest.mark.slow),
    pytest.param((1, 2, 1), {}, id="pp2", marks=pytest.mark.slow),
    pytest.param((1, 1, 2), {}, id="dp2"),
    pytest.param((2, 2, 1), {}, id="tp2-pp2", marks=pytest.mark.slow),
    # Each pair is also in tp2-pp2-dp2 below: these two run in `make test-slow` to keep the main
    # suite within its time on a 2-core CPU.
    pytest.param((2, 1, 2), {}, id="tp2-dp2", marks=pytest.mark.slow),
    pytest.param((1, 2, 2), {}, id="pp2-dp2", marks=pytest.mark.slow),
    pytest.param((2, 2, 2), {}, id="tp2-pp2-dp2"),
    pytest.param((2, 1, 1), {"parallel": {"sequence_parallel": True}}, id="tp2-sp"),
    # Sequence parallelism and recompute are each in the main suite (tp2-sp, pp2-recompute); together
    # with a pipeline they run in `make test-slow` (36 s on 2 AVX2 cores).
    pytest.param((2, 2, 1), {"parallel": {"sequence_parallel": True},
                             "training": {"checkpoint_activations": True}}, id="tp2-pp2-sp-recompute",
                 marks=pytest.mark.slow),
    pytest.param((1, 1, 1), {"training": {"checkpoint_activations": True}}, id="recompute"),
    pytest.param((1, 2, 1), {"training": {"checkpoint_activations": True}}, id="pp2-recompute"),
    pytest.param((2, 1, 2), {"parallel": {"zero_stage": 2}}, id="tp2-dp2-zero2", marks=pytest.mark.slow),
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


@pytest.mark.slow
def test_pipeline_with_the_fused_lm_head_matches_single_process(corpus, reference, tmp_path):
    """TP2 x PP2: the last stage's loss_fn runs the head matmul in token chunks (no logits)."""
    ref_losses, ref_weights = reference
    losses, weights = run(tmp_path, corpus, 2, 2, 1, target=fused_head_worker)
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) <= 1e-5, (losses, ref_losses)
    for name, tensor in ref_weights.items():
        assert (weights[name] - tensor).abs().max().item() <= 1e-5, name
