"""The SLURM scripts without SLURM: syntax, dry runs of every size, chain submission, run status.

Every slurm/*.slurm script is run with DRY_RUN=1 outside any job: it checks its config (plus its
overrides) with ``pretrain_bloom.py --dry-run`` over nodes x processes ranks and prints the
launch command instead of running it. ``scripts/submit_chain.sh`` is run against a fake
``sbatch`` that records its arguments. The real-cluster tier is tests/test_slurm.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from launch import run_command

SLURM = REPO / "slurm"
SHELL_SCRIPTS = sorted(SLURM.glob("*.slurm")) + sorted(SLURM.glob("*.sh")) + [
    REPO / "scripts" / "submit_chain.sh", REPO / "scripts" / "slurm_cluster.sh", REPO / "scripts" / "netns_cluster.sh"]

# script: (nodes, processes per node, parameters, layout, exit_duration_in_mins)
SIZES = {
    "bloom-560m": (4, 8, "559,214,592", "TP1 PP1 DP32", 1190),
    "bloom-1b1": (4, 8, "1,065,314,304", "TP1 PP2 DP16", 1190),
    "bloom-1b7": (8, 8, "1,722,408,960", "TP2 PP2 DP16", 1190),
    "bloom-3b": (8, 8, "3,002,557,440", "TP4 PP4 DP4", 1190),
    "bloom-7b1": (16, 8, "7,069,016,064", "TP4 PP4 DP8", 1190),
    "bloom-176b": (48, 8, "176,247,271,424", "TP4 PP12 DP8", 5985),
    "cpu-tiny": (1, 2, "5,257,216", "TP1 PP1 DP2", 29),
}


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without SLURM's variables (the suite may itself run in a job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(extra)
    return env


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", clean_env())
    return run_command(args, timeout=300, cwd=kwargs.pop("cwd", REPO), **kwargs)


def header(script: Path, name: str) -> list[str]:
    """Values of ``#SBATCH --name=...`` lines."""
    return re.findall(rf"^#SBATCH --{name}=(\S+)", script.read_text(), flags=re.M)


def launch_command(output: str) -> list[str]:
    """The command a DRY_RUN prints after its marker line, split as the shell would."""
    lines = output.splitlines()
    index = next(i for i, line in enumerate(lines) if "launch command" in line)
    return shlex.split(lines[index + 1])


def test_every_size_has_a_script():
    assert sorted(p.stem for p in SLURM.glob("*.slurm")) == sorted(SIZES)


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_syntax(script):
    result = run(["bash", "-n", str(script)])
    assert result.returncode == 0, result.stderr
    text = script.read_text()
    if script.suffix == ".slurm" or script.parent.name == "scripts":
        assert "set -euo pipefail" in text


@pytest.mark.parametrize("name", sorted(SIZES))
def test_headers(name):
    script = SLURM / f"{name}.slurm"
    nodes, _, _, _, _ = SIZES[name]
    assert header(script, "nodes") == [str(nodes)]
    assert header(script, "ntasks-per-node") == ["1"]  # one torchrun per node
    assert header(script, "job-name") == [name]
    assert header(script, "output") == ["logs/%x-%j.out"]
    # Without "B:" SLURM signals every process of the job steps (the ranks), not the batch shell.
    (sig,) = header(script, "signal")
    assert re.fullmatch(r"USR1@\d+", sig), sig
    assert header(script, "time"), "a time limit is what exit_duration_in_mins is computed from"
    if name != "cpu-tiny":
        assert header(script, "gres") == ["gpu:8"]


@pytest.mark.parametrize("name", sorted(SIZES))
def test_dry_run_checks_the_config_and_prints_the_launch(name):
    nodes, procs, params, layout, exit_minutes = SIZES[name]
    result = run(["bash", f"slurm/{name}.slurm"], env=clean_env(DRY_RUN="1"))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    # The config check over the whole allocation, done by pretrain_bloom.py --dry-run.
    assert f"parameters: {params}\n" in out
    assert f"layout: {layout} over {nodes * procs} ranks" in out
    cmd = launch_command(out)
    srun, rest = cmd[: cmd.index("bash")], cmd[cmd.index("bash"):]
    assert srun[0] == "srun"
    for flag in ("--kill-on-bad-exit=1", "--wait=60", f"--nodes={nodes}", f"--ntasks={nodes}",
                 "--ntasks-per-node=1"):
        assert flag in srun, (flag, srun)
    assert rest[1].endswith("slurm/node.sh")
    torchrun = rest[rest.index("torch.distributed.run"):]
    for flag in (f"--nnodes={nodes}", f"--nproc-per-node={procs}", "--rdzv-backend=c10d", "--max-restarts=0"):
        assert flag in torchrun, (flag, torchrun)
    assert any(a.startswith("--rdzv-endpoint=") and a.endswith(":29500") for a in torchrun)
    program = torchrun[torchrun.index("pretrain_bloom.py"):]
    config = "configs/tiny.yaml" if name == "cpu-tiny" else f"configs/{name}.yaml"
    assert program[:3] == ["pretrain_bloom.py", "--config", config]
    sets = [program[i + 1] for i, a in enumerate(program) if a == "--set"]
    assert f"training.exit_duration_in_mins={exit_minutes}" in sets
    assert not (REPO / "logs" / f"{name}-dry-run").exists(), "a dry run must not create log directories"


def test_script_arguments_reach_pretrain_and_are_checked():
    result = run(["bash", "slurm/cpu-tiny.slurm", "--set", "model.num_layers=2"], env=clean_env(DRY_RUN="1"))
    assert result.returncode == 0, result.stderr
    program = launch_command(result.stdout)
    assert program[-2:] == ["--set", "model.num_layers=2"]  # last, so it wins over the script's own
    assert "model: 2 layers" in result.stdout
    bad = run(["bash", "slurm/cpu-tiny.slurm", "--set", "model.n_layer=2"], env=clean_env(DRY_RUN="1"))
    assert bad.returncode != 0
    assert "num_layers" in bad.stderr and "launch command" not in bad.stdout


def test_refuses_to_launch_outside_slurm_without_dry_run():
    result = run(["bash", "slurm/cpu-tiny.slurm"])
    assert result.returncode != 0
    assert "DRY_RUN=1" in result.stderr


def test_time_limit_shorter_than_the_margin_is_refused():
    result = run(["bash", "slurm/cpu-tiny.slurm"], env=clean_env(DRY_RUN="1", EXIT_MARGIN_MINS="30"))
    assert result.returncode != 0
    assert "EXIT_MARGIN_MINS" in result.stderr


def test_scripts_find_the_repository_from_another_directory(tmp_path):
    result = run(["bash", str(SLURM / "cpu-tiny.slurm")], cwd=tmp_path, env=clean_env(DRY_RUN="1"))
    assert result.returncode == 0, result.stderr
    assert "layout: TP1 PP1 DP2 over 2 ranks" in result.stdout


def test_scripts_share_one_repository_search_and_name_bloom_root_when_it_fails(tmp_path):
    searches = {line for script in SLURM.glob("*.slurm") for line in script.read_text().splitlines()
                if line.startswith("source ")}
    assert len(searches) == 1, "every script finds slurm/common.sh with the same line (see slurm/common.sh)"
    copy = tmp_path / "spool" / "slurm_script"  # what sbatch runs: a copy, far from the repository
    copy.parent.mkdir()
    copy.write_text((SLURM / "cpu-tiny.slurm").read_text())
    result = run(["bash", str(copy)], cwd=tmp_path, env=clean_env(DRY_RUN="1"))
    assert result.returncode != 0
    assert "cannot find the repository (slurm/common.sh): set BLOOM_ROOT" in result.stderr
    found = run(["bash", str(copy)], cwd=tmp_path, env=clean_env(DRY_RUN="1", SLURM_SUBMIT_DIR=str(REPO / "slurm")))
    assert found.returncode == 0, found.stderr


def test_a_job_without_time_limit_gets_no_exit_duration(tmp_path):
    script = tmp_path / "custom.slurm"
    script.write_text("#!/usr/bin/env bash\n#SBATCH --nodes=1\nset -euo pipefail\n"
                      'source "$BLOOM_ROOT/slurm/common.sh"\nCONFIG=configs/tiny.yaml\nPROCS_PER_NODE=1\n'
                      'bloom_launch "$@"\n')
    result = run(["bash", str(script)], env=clean_env(DRY_RUN="1", BLOOM_ROOT=str(REPO)))
    assert result.returncode == 0, result.stderr
    assert "layout: TP1 PP1 DP1 over 1 ranks" in result.stdout
    program = launch_command(result.stdout)
    assert program[program.index("pretrain_bloom.py"):] == ["pretrain_bloom.py", "--config", "configs/tiny.yaml"]


@pytest.mark.parametrize("value, minutes", [
    ("30", 30), ("5:30", 5), ("2:00:00", 120), ("20:00:00", 1200), ("100:00:00", 6000), ("1-00:00:00", 1440),
    ("1-2", 1560), ("1-02:30", 1590), ("0:59", 0), ("08:09:00", 489), ("UNLIMITED", None), ("", None),
])
def test_slurm_duration_minutes(value, minutes):
    result = run(["bash", "-c", f'source slurm/common.sh && slurm_duration_minutes "{value}"'])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("" if minutes is None else str(minutes))


def test_node_wrapper_makes_torchrun_ignore_usr1(tmp_path):
    probe = "import os, signal; print(signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN, os.environ['TORCHELASTIC_ERROR_FILE'])"
    result = run(["bash", "slurm/node.sh", sys.executable, "-c", probe],
                 env=clean_env(BLOOM_JOB_LOG_DIR=str(tmp_path), SLURM_NODEID="3"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", f"{tmp_path}/error-node3.json"]
    # A rank installs its own handler over the inherited SIG_IGN and so still receives USR1.
    handler = ("import os, signal; got = []; signal.signal(signal.SIGUSR1, lambda *a: got.append(1)); "
               "os.kill(os.getpid(), signal.SIGUSR1); print(got)")
    result = run(["bash", "slurm/node.sh", sys.executable, "-c", handler])
    assert result.stdout.strip() == "[1]", result.stderr


# -- submit_chain.sh against a fake sbatch -----------------------------------------------------


@pytest.fixture
def fake_sbatch(tmp_path):
    """A ``sbatch`` on PATH that appends its arguments (JSON) to a file and prints job ids."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.jsonl"
    script = bin_dir / "sbatch"
    script.write_text(f"""#!{sys.executable}
import json, sys
from pathlib import Path
calls = Path({str(calls)!r})
n = len(calls.read_text().splitlines()) if calls.exists() else 0
with calls.open("a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
print(f"{{1000 + n}};cluster")
""")
    script.chmod(0o755)
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}")
    return env, lambda: [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def test_submit_chain_array(fake_sbatch, tmp_path):
    env, calls = fake_sbatch
    result = run(["bash", "scripts/submit_chain.sh", "3", "slurm/cpu-tiny.slurm", "--time=5",
                  f"--output={tmp_path}/%j.out", "--", "--set", "training.seed=1"], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1000"]
    (args,) = calls()
    assert args == ["--parsable", "--array=1-3%1", "--time=5", f"--output={tmp_path}/%j.out",
                    str(SLURM / "cpu-tiny.slurm"), "--set", "training.seed=1"]


def test_submit_chain_dependency(fake_sbatch, tmp_path):
    env, calls = fake_sbatch
    result = run(["bash", "scripts/submit_chain.sh", "--dependency", "3", "slurm/bloom-560m.slurm",
                  f"--output={tmp_path}/%j.out"], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1000", "1001", "1002"]
    first, second, third = calls()
    assert first == ["--parsable", f"--output={tmp_path}/%j.out", str(SLURM / "bloom-560m.slurm")]
    assert second[:2] == ["--parsable", "--dependency=afterany:1000"]
    assert third[:2] == ["--parsable", "--dependency=afterany:1001"]


@pytest.mark.parametrize("args", [[], ["0", "slurm/cpu-tiny.slurm"], ["2", "slurm/nope.slurm"]])
def test_submit_chain_rejects_bad_arguments(fake_sbatch, args):
    env, calls = fake_sbatch
    result = run(["bash", "scripts/submit_chain.sh", *args], env=env)
    assert result.returncode == 2
    assert calls() == []


# -- run_status.py -----------------------------------------------------------------------------


def run_status(*args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "scripts/run_status.py", *args])


@pytest.fixture
def run_dir(tmp_path):
    """A run directory as a resumed run leaves it: config, metrics, two checkpoints."""
    from megatron.checkpoint.store import CheckpointStore
    from megatron.config import load_config, save_config
    from megatron.training.logging import MetricsLogger

    run = tmp_path / "run"
    ckpt = tmp_path / "ckpt"
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"logging.run_dir={run}", f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}",
        f"training.kill_switch_path={tmp_path / 'stop'}", "training.train_samples=160",
        "training.global_batch_size=16"])
    save_config(cfg, run / "config.yaml")
    logger = MetricsLogger(str(run), None, rank=0)
    for step in range(1, 6):
        logger.log(step, {"lm loss": 9.0 - step / 10, "learning-rate": 1e-3 * step, "batch-size": 16,
                          "consumed-tokens": step * 16 * 256}, kind="train", samples=16 * step)
    logger.log(5, {"validation loss": 8.5, "validation ppl": 4914.77}, kind="valid", samples=80)
    logger.close()
    store = CheckpointStore(ckpt)
    ckpt.mkdir()
    for step in (3, 5):
        staging = ckpt / f"global_step{step}.tmp-test"
        staging.mkdir()
        torch.save({"step": step}, staging / "mp_rank_00_model_states.pt")
        store.commit(staging.name, f"global_step{step}", {})
    return run, ckpt


def test_run_status_reports_progress_and_checkpoints(run_dir):
    run, ckpt = run_dir
    result = run_status(str(run), "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["checkpoints"]["latest"] == "global_step5"
    assert status["checkpoints"]["latest_complete"] is True
    assert status["checkpoints"]["tags"] == ["global_step5", "global_step3"]
    train = status["metrics"]["train"]
    assert train["step"] == 5 and train["consumed-tokens"] == 5 * 16 * 256
    assert train["lm loss"] == pytest.approx(8.5) and train["learning-rate"] == pytest.approx(5e-3)
    assert status["metrics"]["valid"]["validation loss"] == 8.5
    assert status["total_steps"] == 10
    assert status["kill_switch"]["set"] is False
    text = run_status(str(run)).stdout
    assert "global_step5 (complete)" in text
    assert "step           5 of 10 (50.0%)" in text
    assert "tokens seen    20,480" in text


def test_run_status_flags_an_incomplete_latest(run_dir):
    run, ckpt = run_dir
    model = ckpt / "global_step5" / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:10])  # truncated after the save
    (Path(json.loads(run_status(str(run), "--json").stdout)["kill_switch"]["path"])).touch()
    result = run_status(str(run))
    assert result.returncode == 0, result.stderr
    assert "global_step5 (INCOMPLETE" in result.stdout
    assert "resumes from   global_step3" in result.stdout
    assert "SET: the run stops" in result.stdout


def test_run_status_fails_for_a_missing_directory(tmp_path):
    result = run_status(str(tmp_path / "nothing"))
    assert result.returncode == 2
    assert "not a directory" in result.stderr


def test_run_status_help():
    result = run_status("--help")
    assert result.returncode == 0 and "metrics.jsonl" in result.stdout


# -- requeue after a failed training step, against a fake scontrol -----------------------------


@pytest.mark.parametrize("restarts, max_requeues, scontrol_status, requeued, returned, message", [
    (None, None, 0, "4242", 0, "requeueing job 4242 (1 of at most 3)"),
    ("2", None, 0, "4242", 0, "requeueing job 4242 (3 of at most 3)"),
    ("3", None, 0, None, 9, "after 3 requeue(s) of job 4242 (BLOOM_MAX_REQUEUES=3): not requeueing"),
    (None, "0", 0, None, 9, "after 0 requeue(s) of job 4242 (BLOOM_MAX_REQUEUES=0): not requeueing"),
    (None, "many", 0, None, 9, "BLOOM_MAX_REQUEUES must be a whole number, got 'many'"),
    (None, None, 1, "4242", 9, "scontrol requeue 4242 failed"),
], ids=["first", "last", "cap-reached", "disabled", "bad-cap", "scontrol-fails"])
def test_a_failed_training_step_requeues_the_job_up_to_the_cap(tmp_path, restarts, max_requeues, scontrol_status,
                                                                requeued, returned, message):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol-calls"
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$@" >> {calls}\nexit {scontrol_status}\n')
    (bin_dir / "scontrol").chmod(0o755)
    extra = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "BLOOM_JOB_LOG_DIR": str(tmp_path)}
    if restarts is not None:
        extra["SLURM_RESTART_COUNT"] = restarts  # set by SLURM in a requeued job
    if max_requeues is not None:
        extra["BLOOM_MAX_REQUEUES"] = max_requeues
    result = run(["bash", "-c", "source slurm/common.sh; requeue_after_failure 9; echo \"returned $?\""],
                 env=clean_env(**extra))
    assert result.stdout.strip() == f"returned {returned}", result.stderr
    assert message in result.stderr
    assert (calls.read_text().split() if calls.exists() else []) == (["requeue", requeued] if requeued else [])


def test_an_array_task_requeues_only_itself(tmp_path):
    # The last task of an array has the array's job id: `scontrol requeue 4242` would requeue
    # every task of array 4242, the finished ones too (they ran again on the test cluster).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol-calls"
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_ARRAY_JOB_ID="4242",
                    SLURM_ARRAY_TASK_ID="2", BLOOM_JOB_LOG_DIR=str(tmp_path))
    result = run(["bash", "-c", "source slurm/common.sh; requeue_after_failure 9"], env=env)
    assert result.returncode == 0, result.stderr
    assert "requeueing job 4242_2 (1 of at most 3)" in result.stderr
    assert calls.read_text().split() == ["requeue", "4242_2"]


@pytest.mark.parametrize("name", sorted(SIZES))
def test_scripts_are_requeueable_and_keep_the_log_of_a_failed_run(name):
    script = SLURM / f"{name}.slurm"
    # --requeue: SLURM requeues the job when a node fails, and `scontrol requeue` works even where
    # JobRequeue=0; append: a requeued job (same id, same log file) keeps the failed run's output.
    assert header(script, "open-mode") == ["append"]
    assert re.search(r"^#SBATCH --requeue$", script.read_text(), flags=re.M)
