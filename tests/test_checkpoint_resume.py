"""Train N steps == train k steps, stop, resume, train N - k steps: same losses and weights, bit
for bit (fp32, CPU), with a blend of three languages, batch-size ramp-up and dropout (so every
random stream must be restored), on layouts (1, 1, 1) and (2, 2, 2); and the files of a
checkpoint are Megatron-DeepSpeed's whatever the layout."""

from __future__ import annotations

import json

import pytest
import torch

from launch import run_ranks
from megatron.config import config_from_dict
from megatron.training.logging import read_metrics
from training_utils import gathered_weights, save_local_weights, tiny_run

pytestmark = pytest.mark.distributed

NUM_LAYERS = 2
# (tp, pp, dp), steps in the whole run, the step the first process stops at
LAYOUTS = {"1x1x1": ((1, 1, 1), 8, 4), "2x2x2": ((2, 2, 2), 6, 3)}


def worker(rank: int, body: dict, weights_dir: str) -> dict:
    from megatron.training.pretrain import pretrain

    state = pretrain(config_from_dict(body), on_finish=save_local_weights(weights_dir, NUM_LAYERS))
    return {"iteration": state.iteration, "consumed": state.consumed_samples}


def run_body(tmp, corpus, layout, steps, name, **training):
    tp, pp, _ = layout
    return tiny_run(
        tmp, corpus,
        model={"hidden_dropout": 0.1, "attention_dropout": 0.1},
        parallel={"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
        # Ramp 4 -> 8 samples over the first 16: the stop falls inside the ramp.
        training={"train_iters": steps, "rampup_batch_size": [4, 4, 16], **training},
        checkpoint={"save": str(tmp / name / "checkpoints"), "load": str(tmp / name / "checkpoints"),
                    "save_interval": 2},
        logging={"run_dir": str(tmp / name / "run"), "eval_interval": 3, "eval_iters": 1},
    )


def train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["lm loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}


# (2, 2, 2) runs in `make test-slow` (8 ranks, three runs): the main suite resumes bit for bit at
# (1, 1, 1), from the legacy fixture, and across layouts in test_checkpoint_reshape.py.
@pytest.fixture(scope="module", params=["1x1x1", pytest.param("2x2x2", marks=pytest.mark.slow)])
def runs(request, corpus, tmp_path_factory):
    """An uninterrupted run, and the same run stopped (exit_interval) then resumed."""
    layout, steps, stop = LAYOUTS[request.param]
    world = layout[0] * layout[1] * layout[2]
    tmp = tmp_path_factory.mktemp(request.param)
    for name in ("full", "resumed"):
        (tmp / name / "weights").mkdir(parents=True)
    full = run_ranks(worker, world, (run_body(tmp, corpus, layout, steps, "full"), str(tmp / "full" / "weights")),
                     timeout=600)
    first = run_ranks(worker, world, (run_body(tmp, corpus, layout, steps, "resumed", exit_interval=stop),
                                      str(tmp / "resumed" / "weights")), timeout=600)
    second = run_ranks(worker, world, (run_body(tmp, corpus, layout, steps, "resumed"),
                                       str(tmp / "resumed" / "weights")), timeout=600)
    return {"tmp": tmp, "layout": layout, "steps": steps, "stop": stop, "world": world,
            "full": full[0], "first": first[0], "second": second[0]}


def test_resumed_run_equals_uninterrupted_run_bit_for_bit(runs):
    tmp, steps, stop = runs["tmp"], runs["steps"], runs["stop"]
    assert runs["first"]["iteration"] == stop
    assert runs["second"] == runs["full"] == {"iteration": steps, "consumed": runs["full"]["consumed"]}
    full, resumed = train_losses(tmp / "full" / "run"), train_losses(tmp / "resumed" / "run")
    assert sorted(full) == sorted(resumed) == list(range(1, steps + 1))
    assert resumed == full  # exact float equality, every step before and after the stop
    reference = gathered_weights(tmp / "full" / "weights", runs["world"])
    weights = gathered_weights(tmp / "resumed" / "weights", runs["world"])
    assert set(weights) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(weights[name], tensor), name


BLOCK_KEYS = {f"{module}.{kind}" for module in ("input_layernorm", "self_attention.query_key_value",
                                                 "self_attention.dense", "post_attention_layernorm",
                                                 "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
              for kind in ("weight", "bias")}
LAYER_KEYS = {1: {"word_embeddings.weight", "word_embeddings.norm.weight", "word_embeddings.norm.bias"},
              3: BLOCK_KEYS, 4: BLOCK_KEYS, NUM_LAYERS + 4: {"weight", "bias"}}


def test_checkpoint_has_megatron_deepspeed_layout(runs):
    directory = runs["tmp"] / "resumed" / "checkpoints"
    tp, pp, dp = runs["layout"]
    steps = runs["steps"]
    assert (directory / "latest").read_text() == f"global_step{steps}"
    assert (directory / "latest_checkpointed_iteration.txt").read_text() == str(steps)
    saved = sorted(p.name for p in directory.iterdir() if p.is_dir())
    # save_interval 2, keep_last 3 (the default): older ones were deleted
    assert saved == sorted(f"global_step{i}" for i in sorted({2, 4, 6, 8, runs["stop"], steps}
                                                             & set(range(1, steps + 1)))[-3:])
    files = {p.name for p in (directory / f"global_step{steps}").iterdir()}
    expected = {f"layer_{index:02d}-model_{t:02d}-model_states.pt" for index in LAYER_KEYS for t in range(tp)}
    expected |= {f"mp_rank_{m:02d}_model_states.pt" for m in range(tp * pp)}
    expected |= {f"zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt" for d in range(dp) for m in range(tp * pp)}
    expected.add("manifest.json")
    assert files == expected
    for index, keys in LAYER_KEYS.items():
        for t in range(tp):
            state = torch.load(directory / f"global_step{steps}" / f"layer_{index:02d}-model_{t:02d}-model_states.pt",
                               weights_only=True)
            assert set(state) == keys, index
    manifest = json.loads((directory / f"global_step{steps}" / "manifest.json").read_text())
    assert manifest["layout"]["tensor_model_parallel_size"] == tp and manifest["layout"]["data_parallel_size"] == dp
    assert set(manifest["files"]) == expected - {"manifest.json"}
    assert manifest["train_state"]["iteration"] == steps
