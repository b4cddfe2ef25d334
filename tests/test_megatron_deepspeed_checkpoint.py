"""A checkpoint written by Megatron-DeepSpeed itself (tests/fixtures/megatron_deepspeed_checkpoint:
DeepSpeed's save_checkpoint with Megatron-DeepSpeed's client state, TP1 x PP2 x DP1, ZeRO-1, no
manifest) is found complete, resumes with its optimizer state on its own layout and through the
universal conversion on another, and a file in it that pickles anything outside the allow-list is
refused before any of its code runs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import fixture_maker
from launch import run_ranks

FIXTURE = Path(__file__).parent / "fixtures" / "megatron_deepspeed_checkpoint"
SAVED, STEPS, TOLERANCE = 3, 6, 1e-5


def fixture_copy(tmp_path: Path, precision: str = "fp32") -> Path:
    """The fp32 fixture (ZeRO-1 shards) or the bf16 one (BF16_Optimizer shards), copied."""
    target = tmp_path / "checkpoints"
    shutil.copytree(FIXTURE / ("checkpoints" if precision == "fp32" else "checkpoints_bf16"), target)
    return target


def expected_losses() -> dict[int, float]:
    return {int(k): v for k, v in json.loads((FIXTURE / "losses.json").read_text()).items()}


class RunsCode:
    """What a malicious checkpoint pickles: unpickling it calls os.system."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


# -- found, described, scanned -------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_megatron_deepspeed_checkpoint_is_complete_and_described(tmp_path, precision):
    from megatron.checkpoint.store import CheckpointStore

    info, report = CheckpointStore(fixture_copy(tmp_path, precision)).find_newest_complete()
    assert report == []
    assert info.tag == f"global_step{SAVED}" and info.manifest["format"] == "megatron-deepspeed"
    assert info.manifest["layout"] == {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 2,
                                       "data_parallel_size": 1, "world_size": 2, "zero_stage": 1,
                                       "bf16": precision == "bf16", "fp16": False, "pipelined": True}
    # 3 iterations of 4 samples of 32 tokens (the fixture's run).
    assert info.manifest["train_state"] == {"iteration": 3, "consumed_samples": 12, "consumed_tokens": 384}


def test_a_missing_optimizer_shard_makes_it_incomplete(tmp_path):
    from megatron.checkpoint.store import CheckpointStore

    checkpoints = fixture_copy(tmp_path)
    (checkpoints / f"global_step{SAVED}" / "zero_pp_rank_0_mp_rank_01_optim_states.pt").unlink()
    info, report = CheckpointStore(checkpoints).find_newest_complete()
    assert info is None
    assert "zero_pp_rank_0_mp_rank_01_optim_states.pt" in report[0] and "missing" in report[0]


def test_a_malicious_pickle_is_refused_before_it_runs(tmp_path):
    from megatron.checkpoint.pickle_scan import scan_file
    from megatron.checkpoint.store import CheckpointStore
    from megatron.checkpoint.universal_conversion import convert_to_universal
    from megatron.errors import UntrustedCheckpointError

    checkpoints = fixture_copy(tmp_path)
    step = checkpoints / f"global_step{SAVED}"
    evidence = tmp_path / "code-ran"
    engine_file = step / "mp_rank_00_model_states.pt"
    state = torch.load(engine_file, weights_only=False)  # the fixture is ours: trusted here
    state["args"].note = RunsCode(f"touch {evidence}")
    torch.save(state, engine_file)

    with pytest.raises(UntrustedCheckpointError) as refused:
        scan_file(engine_file)
    assert str(engine_file) in str(refused.value) and "posix.system" in str(refused.value)
    info, report = CheckpointStore(checkpoints).find_newest_complete()
    assert info is None and "posix.system" in report[0]
    with pytest.raises(UntrustedCheckpointError):
        convert_to_universal(step, checkpoints / "out", pipelined_target=False, num_layers=2)
    assert not evidence.exists()
    assert not (checkpoints / "out").exists() and not (checkpoints / "out.tmp").exists()


# -- resuming ------------------------------------------------------------------------------------


def _run_from(rank: int, body: dict, out: str) -> dict:
    """Resume from the fixture; on every rank record the optimizer state the engine holds."""
    from megatron.config import config_from_dict
    from megatron.training.pretrain import pretrain

    def record(engine, parallel):
        state = engine.optimizer.state_dict()
        torch.save({"fp32": state["single_partition_of_fp32_groups"], "base": state["base_optimizer_state"],
                    "steps": engine.global_steps}, f"{out}/rank{rank}.pt")

    result = pretrain(config_from_dict(body), on_finish=record)
    return {"iteration": result.iteration, "consumed": result.consumed_samples}


def _resume(tmp_path, corpus, layout, train_iters, precision="fp32"):
    body = fixture_maker(FIXTURE).body

    from megatron.training.logging import read_metrics

    checkpoints = fixture_copy(tmp_path, precision)
    run = body(tmp_path, corpus, "resumed", layout=layout, train_iters=train_iters, bf16=precision == "bf16")
    run["checkpoint"] = {"load": str(checkpoints)}
    out = tmp_path / "optimizer"
    out.mkdir()
    results = run_ranks(_run_from, layout[0] * layout[1] * layout[2], (run, str(out)), timeout=600)
    records = read_metrics(tmp_path / "resumed" / "run" / "metrics.jsonl")
    losses = {r["step"]: r["lm loss"] for r in records if r["kind"] == "train"}
    return checkpoints, results, losses, out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resumes_on_its_own_layout_with_its_optimizer_state(tmp_path, corpus, precision):
    """TP1 x PP2 x DP1, as saved: the engine holds exactly the saved ZeRO-1 / BF16_Optimizer shards
    (fp32 master weights and Adam moments; no step taken)."""
    from megatron.checkpoint.pickle_scan import safe_load

    checkpoints, results, losses, out = _resume(tmp_path, corpus, (1, 2, 1), train_iters=SAVED, precision=precision)
    assert results[0] == {"iteration": SAVED, "consumed": 12} and losses == {}
    prefix = "bf16_" if precision == "bf16" else ""
    for rank in range(2):
        held = torch.load(out / f"rank{rank}.pt", weights_only=True)
        saved = safe_load(checkpoints / f"global_step{SAVED}" /
                          f"{prefix}zero_pp_rank_0_mp_rank_{rank:02d}_optim_states.pt")
        saved = saved["optimizer_state_dict"]
        assert held["steps"] == SAVED
        for mine, theirs in zip(held["fp32"], saved["single_partition_of_fp32_groups"], strict=True):
            assert torch.equal(mine, theirs)
        for group, state in saved["base_optimizer_state"]["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(held["base"]["state"][group][key], state[key]), (rank, group, key)
            assert int(held["base"]["state"][group]["step"]) == SAVED


@pytest.mark.slow
@pytest.mark.distributed
def test_continues_on_its_own_layout_like_the_uninterrupted_run(tmp_path, corpus):
    """Steps 4..6 after resuming equal the uninterrupted Megatron-DeepSpeed-layout run's, bit for bit."""
    _, results, losses, _ = _resume(tmp_path, corpus, (1, 2, 1), train_iters=STEPS)
    assert results[0]["iteration"] == STEPS
    expected = expected_losses()
    assert losses == {step: expected[step] for step in range(SAVED + 1, STEPS + 1)}


@pytest.mark.distributed
@pytest.mark.slow  # 25 s; the own-layout resumes with optimizer state are slow too
def test_continues_on_another_layout_through_the_universal_conversion(tmp_path, corpus, capfd):
    """One process, no pipeline: converted (the optimizer state with it), then steps 4..6 within 1e-5
    of the uninterrupted run (a fresh optimizer would not be)."""
    checkpoints, results, losses, _ = _resume(tmp_path, corpus, (1, 1, 1), train_iters=STEPS)
    console = "".join(capfd.readouterr())
    assert "saved on layout TP1 PP2 DP1" in console
    assert (checkpoints / f"global_step{SAVED}_universal" / "universal.json").is_file()
    assert results[0] == {"iteration": STEPS, "consumed": STEPS * 4}
    expected = expected_losses()
    assert sorted(losses) == list(range(SAVED + 1, STEPS + 1))
    assert max(abs(losses[s] - expected[s]) for s in losses) <= TOLERANCE, (losses, expected)


def test_random_streams_of_both_megatron_deepspeed_forks():
    """BigScience's fork (BLOOM's) saves data-parallel rank 0's streams as flat keys, restored on
    every rank; Microsoft's saves one entry per data-parallel rank under ``rng_state``."""
    from megatron.checkpoint.megatron_deepspeed import rng_state

    flat = {"random_rng_state": (3, (1, 2), None), "np_rng_state": ("MT19937",), "torch_rng_state": torch.ones(2),
            "cuda_rng_state": torch.zeros(16), "rng_tracker_states": {"model-parallel-rng": torch.ones(3)}}
    for dp_rank in (0, 3):
        assert rng_state({"iteration": 3, **flat}, dp_rank) == flat
    per_rank = [{"random_rng_state": i} for i in range(4)]
    assert rng_state({"rng_state": per_rank}, 2) == {"random_rng_state": 2}
    assert rng_state({"iteration": 3}, 0) is None
