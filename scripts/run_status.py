#!/usr/bin/env python
"""Where a training run stands, from its run directory: checkpoints, progress, loss, lr.

    .venv/bin/python scripts/run_status.py runs/bloom-176b
    .venv/bin/python scripts/run_status.py runs/bloom-176b --json

Reads what the run writes and nothing else, so it is safe to call while jobs are running:

* ``{run_dir}/config.yaml``: the resolved config the run was started with (for the checkpoint
  directory, the kill-switch path and the length of the run);
* ``{run_dir}/metrics.jsonl``: the last logged training step (loss, learning rate, batch size,
  tokens seen = ``consumed-tokens``) and the last validation;
* ``{run_dir}/environment.json``: what the run ran on (commit, package versions, device,
  host allocator, precision and why, layout), written at start-up;
* the checkpoint directory: the tag ``latest`` names and whether that checkpoint is complete
  (its manifest lists every file with its size and the files match), and the newest complete one.

Relative paths in the config are taken from the current directory: run it from the directory
the jobs ran in (the repository root for slurm/*.slurm). Exits with status 2 when the run
directory does not exist.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command line: the run directory and where to look for checkpoints."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the run's logging.run_dir (holds metrics.jsonl and config.yaml)")
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="checkpoint directory (default: checkpoint.save from {run_dir}/config.yaml)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser.parse_args(argv)


def load_run_config(run_dir: Path) -> tuple[Optional[Any], Optional[str]]:
    """The run's resolved config, or None and the reason it could not be read."""
    from megatron.config import ConfigError, load_config

    path = run_dir / "config.yaml"
    if not path.is_file():
        return None, f"{path} does not exist (the run has not started yet?)"
    try:
        return load_config(path), None
    except ConfigError as exc:
        return None, str(exc)


def checkpoint_status(directory: Path) -> dict[str, Any]:
    """``latest`` and whether it is complete, the newest complete checkpoint, all tags."""
    from megatron.checkpoint.store import CheckpointStore, verify_checkpoint

    store = CheckpointStore(directory)
    status: dict[str, Any] = {"directory": str(directory), "exists": directory.is_dir()}
    if not directory.is_dir():
        return status
    latest = store.latest_tag()
    status["latest"] = latest
    if latest is not None:
        problems = verify_checkpoint(directory / latest) if (directory / latest).is_dir() else [
            f"{directory / latest} does not exist"]
        status["latest_complete"] = not problems
        status["latest_problems"] = problems
    newest, report = store.find_newest_complete()
    status["newest_complete"] = newest.tag if newest is not None else None
    status["tags"] = store.tags()
    status["notes"] = report
    return status


def metrics_status(path: Path) -> dict[str, Any]:
    """The last training record (step, loss, lr, batch size, tokens) and the last validation."""
    from megatron.training.logging import read_metrics

    status: dict[str, Any] = {"path": str(path), "exists": path.is_file()}
    if not path.is_file():
        return status
    records = read_metrics(path)
    status["age_seconds"] = time.time() - path.stat().st_mtime
    train = [r for r in records if r.get("kind") == "train"]
    valid = [r for r in records if r.get("kind") == "valid" and "validation loss" in r]
    if train:
        last = train[-1]
        status["train"] = {"step": last["step"], "lm loss": last.get("lm loss"),
                           "learning-rate": last.get("learning-rate"), "batch-size": last.get("batch-size"),
                           "consumed-tokens": last.get("consumed-tokens"), "samples": last.get("samples"),
                           "grad-norm": last.get("grad-norm"), "skipped-iterations": last.get("skipped-iterations")}
    if valid:
        last = valid[-1]
        status["valid"] = {"step": last["step"], "validation loss": last["validation loss"],
                           "validation ppl": last.get("validation ppl")}
    return status


def environment_status(run_dir: Path) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """The run's environment.json, or None (not written yet, or by a version before it existed)
    and, when the file is there but unreadable, the reason."""
    from megatron.training.environment import read_environment

    try:
        return read_environment(run_dir), None
    except ValueError as exc:
        return None, str(exc)


def collect(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the report shows, as plain data."""
    from megatron.training.schedules import BatchSizeRampup, total_train_iterations

    run_dir: Path = args.run_dir
    cfg, config_problem = load_run_config(run_dir)
    status: dict[str, Any] = {"run_dir": str(run_dir)}
    if config_problem:
        status["config_problem"] = config_problem
    checkpoints = args.checkpoints
    if checkpoints is None and cfg is not None and cfg.checkpoint.save:
        checkpoints = Path(cfg.checkpoint.save)
    if checkpoints is not None:
        status["checkpoints"] = checkpoint_status(checkpoints)
    status["metrics"] = metrics_status(run_dir / "metrics.jsonl")
    status["environment"], environment_problem = environment_status(run_dir)
    if environment_problem:
        status["environment_problem"] = environment_problem
    if cfg is not None:
        status["total_steps"] = total_train_iterations(cfg.training, BatchSizeRampup.from_config(cfg.training))
        if cfg.training.kill_switch_path:
            status["kill_switch"] = {"path": cfg.training.kill_switch_path,
                                     "set": Path(cfg.training.kill_switch_path).exists()}
        status["tensorboard_dir"] = cfg.logging.tensorboard_dir
    return status


def _number(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return str(value)
    return format(value, fmt)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _environment_lines(env: dict[str, Any]) -> list[str]:
    """The environment.json block: enough to tell two runs' code, software and hardware apart."""
    git, packages = env.get("git") or {}, env.get("packages") or {}
    device, cpu = env.get("device") or {}, env.get("cpu") or {}
    precision, layout = env.get("precision") or {}, env.get("layout") or {}
    dirty = {True: " (dirty)", False: " (clean)"}.get(git.get("dirty"), "")
    commit = f"{git['commit'][:12]}{dirty}" if git.get("commit") else "unknown (not a git checkout, or no git)"
    cuda = f" (CUDA {packages['cuda']})" if packages.get("cuda") else ""
    native = [name for key, name in (("avx512_bf16", "AVX-512 BF16"), ("amx_tile", "AMX")) if cpu.get(key)]
    bf16 = f"native bf16 ({', '.join(native)})" if native else "no native bf16"
    return [f"environment      written {env.get('written_at')} on {env.get('hostname')}",
            f"  commit         {commit}",
            f"  packages       torch {packages.get('torch')}{cuda}, deepspeed {packages.get('deepspeed')}",
            f"  device         {device.get('type')} ({device.get('name')})",
            f"  cpu            capability {cpu.get('capability')}, {bf16}",
            # Records written before the field existed have none: the line is left out.
            *([f"  allocator      {env['host_allocator']}"] if env.get("host_allocator") else []),
            f"  precision      {precision.get('name')}: {precision.get('reason')}",
            f"  layout         {env.get('world_size')} ranks: TP{layout.get('tp')} PP{layout.get('pp')} "
            f"DP{layout.get('dp')} ZeRO-{layout.get('zero_stage')}"]


def render(status: dict[str, Any]) -> str:
    """The status as a short human-readable table."""
    lines = [f"run directory    {status['run_dir']}"]
    if "config_problem" in status:
        lines.append(f"config           {status['config_problem']}")
    ckpt = status.get("checkpoints")
    if ckpt is None:
        lines.append("checkpoints      unknown (no config.yaml; pass --checkpoints)")
    elif not ckpt["exists"]:
        lines.append(f"checkpoints      {ckpt['directory']}: none yet")
    else:
        lines.append(f"checkpoints      {ckpt['directory']} ({len(ckpt['tags'])} saved)")
        latest = ckpt.get("latest")
        if latest is None:
            lines.append("  latest         none")
        elif ckpt["latest_complete"]:
            lines.append(f"  latest         {latest} (complete)")
        else:
            lines.append(f"  latest         {latest} (INCOMPLETE: {'; '.join(ckpt['latest_problems'][:2])})")
        if ckpt.get("newest_complete") != latest:
            lines.append(f"  resumes from   {ckpt.get('newest_complete') or 'nothing (no complete checkpoint)'}")
        lines.extend(f"  note           {note}" for note in ckpt.get("notes", []))
    metrics = status["metrics"]
    total = status.get("total_steps")
    if not metrics["exists"]:
        lines.append(f"metrics          {metrics['path']}: none yet")
    else:
        lines.append(f"metrics          {metrics['path']} (updated {_age(metrics['age_seconds'])})")
        train = metrics.get("train")
        if train:
            of = f" of {total:,} ({100 * train['step'] / total:.1f}%)" if total else ""
            lines.append(f"  step           {train['step']:,}{of}")
            lines.append(f"  lm loss        {_number(train['lm loss'], '.6f')}")
            lines.append(f"  learning rate  {_number(train['learning-rate'], '.3e')}")
            lines.append(f"  batch size     {train['batch-size']}")
            lines.append(f"  tokens seen    {_number(train['consumed-tokens'], ',')}")
        valid = metrics.get("valid")
        if valid:
            lines.append(f"  validation     loss {_number(valid['validation loss'], '.4f')}, "
                         f"ppl {_number(valid['validation ppl'], '.2f')} at step {valid['step']:,}")
    if status.get("environment"):
        lines.extend(_environment_lines(status["environment"]))
    elif "environment_problem" in status:
        lines.append(f"environment      {status['environment_problem']}")
    else:
        lines.append("environment      none yet (environment.json is written when training starts)")
    if "kill_switch" in status:
        ks = status["kill_switch"]
        state = "SET: the run stops at its next step" if ks["set"] else "not set"
        lines.append(f"kill switch      {ks['path']} ({state})")
    if status.get("tensorboard_dir"):
        lines.append(f"tensorboard      tensorboard --logdir {status['tensorboard_dir']}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"run_status: {args.run_dir} is not a directory: pass the run's logging.run_dir "
              "(e.g. runs/tiny)", file=sys.stderr)
        return 2
    # Libraries the checks import (DeepSpeed, for the pickle scan's allow-list) log to stdout as
    # they load; stdout is the report (often piped into jq), so their lines go to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        status = collect(args)
    print(json.dumps(status, indent=1, default=str) if args.json else render(status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
