"""Checkpoints never lose work: atomic commits, detection of broken checkpoints, retention, and a
training process killed (SIGKILL) in the middle of a save."""

from __future__ import annotations

import json
import os

import pytest
import torch

from launch import run_ranks
from megatron.checkpoint.checkpointing import Checkpointer
from megatron.checkpoint.layout import checkpoint_tag
from megatron.checkpoint.store import (
    CheckpointStore,
    check_torch_file,
    checkpoints_to_delete,
    new_temporary_tag,
    verify_checkpoint,
)
from megatron.config import config_from_dict
from megatron.core.parallel_state import ParallelState
from megatron.model.layout import flat_name, pipeline_name, split_into_layers
from megatron.training.logging import read_metrics
from megatron.utils.atomic import atomic_write_text
from training_utils import synthetic_corpus, tiny_run

# -- the store, without training ------------------------------------------------------------------


def write_checkpoint(store: CheckpointStore, iteration: int, files=("mp_rank_00_model_states.pt", "optim.pt"),
                     metadata=None) -> None:
    """A committed checkpoint of small torch files, the way Checkpointer.save commits one."""
    temporary = new_temporary_tag(checkpoint_tag(iteration))
    (store.directory / temporary).mkdir(parents=True)
    for i, name in enumerate(files):
        torch.save({"w": torch.full((64,), float(iteration + i))}, store.directory / temporary / name)
    store.commit(temporary, checkpoint_tag(iteration), metadata or {"layout": {"tensor_model_parallel_size": 1}})


def test_commit_writes_manifest_and_latest(tmp_path):
    store = CheckpointStore(tmp_path)
    write_checkpoint(store, 10)
    manifest = json.loads((tmp_path / "global_step10" / "manifest.json").read_text())
    assert manifest["iteration"] == 10 and manifest["layout"] == {"tensor_model_parallel_size": 1}
    assert manifest["files"] == {name: (tmp_path / "global_step10" / name).stat().st_size
                                 for name in ("mp_rank_00_model_states.pt", "optim.pt")}
    assert (tmp_path / "latest").read_text() == "global_step10"
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "10"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert verify_checkpoint(tmp_path / "global_step10") == []


@pytest.mark.parametrize("damage, message", [
    ("truncate", "has 100 bytes but the manifest records"),
    ("zero-fill", "is not a readable torch.save archive"),
    ("delete", "is missing"),
    ("no-manifest", "manifest.json is missing"),
])
def test_a_broken_newest_checkpoint_is_skipped(tmp_path, damage, message):
    store = CheckpointStore(tmp_path)
    write_checkpoint(store, 5)
    write_checkpoint(store, 10)
    shard = tmp_path / "global_step10" / "optim.pt"
    if damage == "truncate":
        os.truncate(shard, 100)
    elif damage == "zero-fill":
        shard.write_bytes(bytes(shard.stat().st_size))
    elif damage == "delete":
        shard.unlink()
    else:
        (tmp_path / "global_step10" / "manifest.json").unlink()
    info, report = store.find_newest_complete()
    assert info.tag == "global_step5"
    assert len(report) == 1 and "skipping checkpoint" in report[0] and str(tmp_path / "global_step10") in report[0]
    assert message in report[0]


def test_interrupted_save_is_ignored_and_cleaned_up(tmp_path):
    store = CheckpointStore(tmp_path)
    write_checkpoint(store, 5)
    interrupted = tmp_path / new_temporary_tag("global_step10")
    interrupted.mkdir()
    torch.save({"w": torch.ones(3)}, interrupted / "mp_rank_00_model_states.pt")
    info, report = store.find_newest_complete()
    assert info.tag == "global_step5"
    assert any("interrupted save" in line and interrupted.name in line for line in report)
    assert store.remove_leftovers() == [interrupted] and not interrupted.exists()


def test_saving_the_same_step_again_replaces_it(tmp_path):
    store = CheckpointStore(tmp_path)
    write_checkpoint(store, 5, files=("a.pt",))
    write_checkpoint(store, 5, files=("b.pt",))
    assert sorted(p.name for p in (tmp_path / "global_step5").iterdir()) == ["b.pt", "manifest.json"]
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["global_step5"]


def checkpointer_for(tmp_path, **model):
    body = tiny_run(tmp_path, [], checkpoint={"save": str(tmp_path), "load": str(tmp_path)})
    body["model"].update(model)
    return Checkpointer(config_from_dict(body), ParallelState.single())


def test_resume_point_needs_a_complete_checkpoint_and_the_same_model(tmp_path):
    checkpointer = checkpointer_for(tmp_path)
    assert checkpointer.find_resume_point() is None  # nothing there: start from scratch
    metadata = {"layout": checkpointer.layout(), "config": checkpointer.cfg.to_dict()}
    store = CheckpointStore(tmp_path)
    write_checkpoint(store, 4, metadata=metadata)
    resume = checkpointer.find_resume_point()
    assert (resume.tag, resume.iteration, resume.universal) == ("global_step4", 4, False)
    # the same checkpoint for a run on another layout needs the universal conversion
    other = Checkpointer(checkpointer.cfg, ParallelState.single())
    other.layout = lambda: {**checkpointer.layout(), "data_parallel_size": 2}
    assert other.find_resume_point().universal
    with pytest.raises(ValueError, match="holds a different model .*model.hidden_size: checkpoint 64, config 128"):
        checkpointer_for(tmp_path, hidden_size=128).find_resume_point()
    os.truncate(tmp_path / "global_step4" / "optim.pt", 10)
    with pytest.raises(ValueError, match=f"none of the checkpoints in {tmp_path} is complete"):
        checkpointer.find_resume_point()


def test_check_torch_file_reads_no_pickle(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"x": torch.arange(10)}, good)
    assert check_torch_file(good) is None
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    assert "not a readable torch.save archive" in check_torch_file(text)


@pytest.mark.parametrize("iterations, keep_last, keep_every, deleted", [
    ([100, 200, 300, 400, 500], 3, None, [100, 200]),
    ([100, 200, 300, 400, 500], 2, 200, [100, 300]),
    ([100, 200, 300], None, None, []),
    ([100, 200, 300], 0, None, [100, 200]),  # the newest always stays
])
def test_retention_keeps_the_last_k_and_every_mth(iterations, keep_last, keep_every, deleted):
    assert checkpoints_to_delete(iterations, keep_last, keep_every) == deleted


def test_retention_deletes_whole_checkpoints(tmp_path):
    store = CheckpointStore(tmp_path)
    for iteration in (1, 2, 3, 4):
        write_checkpoint(store, iteration)
    (tmp_path / "global_step1_universal").mkdir()
    assert store.apply_retention(keep_last=2, keep_every=None) == ["global_step1", "global_step2"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["global_step3", "global_step4"]


def test_atomic_write_replaces_content(tmp_path):
    target = tmp_path / "latest"
    atomic_write_text(target, "global_step1")
    atomic_write_text(target, "global_step2")
    assert target.read_text() == "global_step2" and [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_layer_split_and_names_match_the_pipeline():
    state = {"embedding.word_embeddings.weight": 1, "embedding.word_embeddings.norm.bias": 2,
             "layers.0.mlp.dense_h_to_4h.weight": 3, "layers.1.input_layernorm.weight": 4,
             "final_layernorm.weight": 5}
    assert split_into_layers(state, num_layers=2) == {
        1: {"word_embeddings.weight": 1, "word_embeddings.norm.bias": 2}, 3: {"mlp.dense_h_to_4h.weight": 3},
        4: {"input_layernorm.weight": 4}, 6: {"weight": 5}}
    for name in state:
        assert flat_name(pipeline_name(name, 2), 2) == name
    assert pipeline_name("embedding.word_embeddings.weight", 2) == "tied_modules.embed.word_embeddings.weight"
    assert pipeline_name("layers.1.input_layernorm.weight", 2) == "4.input_layernorm.weight"
    assert pipeline_name("final_layernorm.bias", 2) == "6.bias"


# -- killed while saving ---------------------------------------------------------------------------

STEPS = 6


def killed_while_saving_worker(rank: int, body: dict, doomed_tag: str) -> None:
    """Train; when DeepSpeed writes its first file of ``doomed_tag``, write half of it and die."""
    import signal

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from megatron.training.pretrain import pretrain

    original = TorchCheckpointEngine.save

    def save(self, state_dict, path):
        original(self, state_dict, path)
        if f"/{doomed_tag}." in str(path):
            os.truncate(path, os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    TorchCheckpointEngine.save = save
    pretrain(config_from_dict(body))


def train_worker(rank: int, body: dict) -> int:
    from megatron.training.pretrain import pretrain

    return pretrain(config_from_dict(body)).iteration


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["lm loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}


@pytest.mark.distributed
def test_sigkill_during_save_keeps_previous_checkpoint_then_truncated_shard_is_skipped(tmp_path, capfd):
    corpus = synthetic_corpus(tmp_path / "corpus")
    checkpoints = tmp_path / "checkpoints"

    def body(run: str) -> dict:
        return tiny_run(tmp_path, corpus, training={"train_iters": STEPS},
                        checkpoint={"save": str(checkpoints), "load": str(checkpoints), "save_interval": 3},
                        logging={"run_dir": str(tmp_path / run), "eval_interval": 0})

    # 1. Killed while writing global_step6: global_step3 stays the newest complete checkpoint.
    with pytest.raises(AssertionError, match="died without a result"):
        run_ranks(killed_while_saving_worker, 1, (body("killed"), "global_step6"))
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("global_step")) == [
        "global_step3", next(p.name for p in checkpoints.iterdir() if p.name.startswith("global_step6.tmp-"))]
    assert (checkpoints / "latest").read_text() == "global_step3"
    killed = losses(tmp_path / "killed")
    assert sorted(killed) == list(range(1, STEPS + 1))  # it had trained all steps, then died saving
    capfd.readouterr()

    # 2. The next start resumes from global_step3 and redoes steps 4-6 exactly.
    (result,) = run_ranks(train_worker, 1, (body("restarted"),))
    err = capfd.readouterr().err
    assert result == STEPS
    assert "resuming from checkpoint" in err and "global_step3 (iteration 3)" in err
    assert "interrupted save" in err
    assert losses(tmp_path / "restarted") == {step: killed[step] for step in (4, 5, 6)}
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["global_step3", "global_step6"]
    assert verify_checkpoint(checkpoints / "global_step6") == []

    # 3. A truncated shard in global_step6 is reported and skipped: back to global_step3.
    shard = checkpoints / "global_step6" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    os.truncate(shard, shard.stat().st_size - 1000)
    (result,) = run_ranks(train_worker, 1, (body("after-truncation"),))
    err = capfd.readouterr().err
    assert result == STEPS
    assert f"skipping checkpoint {checkpoints / 'global_step6'}" in err
    assert "but the manifest records" in err and "zero_pp_rank_0_mp_rank_00_optim_states.pt" in err
    assert "global_step3 (iteration 3)" in err
    assert losses(tmp_path / "after-truncation") == {step: killed[step] for step in (4, 5, 6)}
    assert verify_checkpoint(checkpoints / "global_step6") == []  # saved again, complete
