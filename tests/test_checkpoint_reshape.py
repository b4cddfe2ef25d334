"""Resume on another layout: a checkpoint saved at (TP, PP, DP) = (2, 2, 2) continues at (1, 1, 1)
and at (1, 2, 4) through DeepSpeed's universal checkpoint, with the optimizer state, and the
losses and final weights stay within 1e-5 (fp32) of a run that never changed layout."""

from __future__ import annotations

import json
import shutil

import pytest

from launch import run_ranks
from megatron.config import config_from_dict
from megatron.training.logging import read_metrics
from training_utils import gathered_weights, save_local_weights, tiny_run

pytestmark = pytest.mark.distributed

NUM_LAYERS = 2
STEPS, STOP = 6, 3
TOLERANCE = 1e-5


def worker(rank: int, body: dict, weights_dir: str) -> dict:
    from megatron.training.pretrain import pretrain

    state = pretrain(config_from_dict(body), on_finish=save_local_weights(weights_dir, NUM_LAYERS))
    return {"iteration": state.iteration, "consumed": state.consumed_samples}


def run(tmp, corpus, name, layout, load=None, save_interval=100, **training):
    """Train ``name`` at ``layout`` (saving under ``tmp/name``, loading from ``load``)."""
    tp, pp, dp = layout
    directory = tmp / name
    (directory / "weights").mkdir(parents=True, exist_ok=True)
    save = str(directory / "checkpoints")
    body = tiny_run(tmp, corpus, parallel={"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
                    training={"train_iters": STEPS, **training},
                    checkpoint={"save": save, "load": str(load) if load else save, "save_interval": save_interval},
                    logging={"run_dir": str(directory / "run"), "eval_interval": 0})
    results = run_ranks(worker, tp * pp * dp, (body, str(directory / "weights")), timeout=600)
    records = read_metrics(directory / "run" / "metrics.jsonl")
    losses = {r["step"]: r["lm loss"] for r in records if r["kind"] == "train"}
    return results[0], losses, directory


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """Never changes layout: (1, 1, 1) for all steps (saving global_step{STOP} on the way)."""
    tmp = tmp_path_factory.mktemp("reference")
    result, losses, directory = run(tmp, corpus, "reference", (1, 1, 1), save_interval=STOP)
    assert result["iteration"] == STEPS
    return losses, gathered_weights(directory / "weights", 1), directory / "checkpoints"


@pytest.fixture(scope="module")
def saved_222(corpus, tmp_path_factory):
    """Train at (2, 2, 2) and stop after STOP steps, leaving global_step{STOP}."""
    tmp = tmp_path_factory.mktemp("reshape")
    result, losses, directory = run(tmp, corpus, "saved", (2, 2, 2), exit_interval=STOP)
    assert result["iteration"] == STOP
    return tmp, losses, directory / "checkpoints"


def assert_continues(losses, weights_dir, layout, reference):
    """Losses and final weights within TOLERANCE of the run that never changed layout."""
    ref_losses, ref_weights, _ = reference
    differences = {s: abs(losses[s] - ref_losses[s]) for s in losses}
    print(f"max loss difference after resuming at {layout}: {max(differences.values()):.2e}")
    assert max(differences.values()) <= TOLERANCE, (losses, ref_losses)
    weights = gathered_weights(weights_dir, layout[0] * layout[1] * layout[2])
    assert set(weights) == set(ref_weights)
    for key, tensor in ref_weights.items():
        assert (weights[key] - tensor).abs().max().item() <= TOLERANCE, key


# to-1x2x4 (44 s on 2 AVX2 cores) runs in `make test-slow`: the main suite resumes the 2x2x2 run on
# 1x1x1 here, and the two-host tier resumes TP2xDP2 as TP2xDP1 across a real network.
@pytest.mark.parametrize("layout", [(1, 1, 1), pytest.param((1, 2, 4), marks=pytest.mark.slow)],
                         ids=["to-1x1x1", "to-1x2x4"])
def test_resume_on_another_layout_continues_the_run(layout, corpus, reference, saved_222, capfd):
    ref_losses, ref_weights, _ = reference
    tmp, first_losses, checkpoints = saved_222
    assert max(abs(first_losses[s] - ref_losses[s]) for s in range(1, STOP + 1)) <= TOLERANCE
    capfd.readouterr()
    name = "x".join(map(str, layout))
    result, losses, directory = run(tmp, corpus, name, layout, load=checkpoints)
    console = "".join(capfd.readouterr())
    assert f"resuming from checkpoint {checkpoints / f'global_step{STOP}'}" in console
    assert "saved on layout TP2 PP2 DP2" in console
    assert result == {"iteration": STEPS, "consumed": STEPS * 8}
    assert sorted(losses) == list(range(STOP + 1, STEPS + 1))
    assert_continues(losses, directory / "weights", layout, reference)
    # The conversion is kept next to the checkpoint and reused; new checkpoints use the new layout.
    assert (checkpoints / f"global_step{STOP}_universal" / "universal.json").is_file()
    manifest = json.loads((directory / "checkpoints" / f"global_step{STEPS}" / "manifest.json").read_text())
    assert manifest["layout"]["data_parallel_size"] == layout[2]


def test_single_process_checkpoint_resumes_tensor_parallel(corpus, reference, tmp_path):
    """The other direction: a (1, 1, 1) checkpoint (single-module names) split over TP = 2."""
    _, _, reference_checkpoints = reference
    source = tmp_path / "from-1x1x1"
    shutil.copytree(reference_checkpoints / f"global_step{STOP}", source / f"global_step{STOP}")
    result, losses, directory = run(tmp_path, corpus, "2x1x1", (2, 1, 1), load=source)
    assert result == {"iteration": STEPS, "consumed": STEPS * 8}
    assert sorted(losses) == list(range(STOP + 1, STEPS + 1))
    assert_continues(losses, directory / "weights", (2, 1, 1), reference)
