#!/usr/bin/env python3
"""Random kill -9 trials: nothing is lost when a run is killed at any moment and started again.

    python tests/faults/run_trials.py --seeds 1,2,3            # CI: fixed seeds
    python tests/faults/run_trials.py --trials 20              # fresh seeds, logged
    python tests/faults/run_trials.py --seeds 7 --kinds convert  # replay one trial

Each trial is one kind of run, killed with SIGKILL one to three times at random moments
(tests/faults/harness.py) and started again with the same command until it finishes:

* ``train``: a small fp32 run (pretrain_bloom.py, one process, a checkpoint every
  ``SAVE_INTERVAL`` steps), killed during start-up, steps and saves;
* ``convert``: the same run resumed with another ZeRO stage, which converts its checkpoint to a
  universal one first, killed during the conversion too; the reference makes the same layout
  change uninterrupted;
* ``preprocess``: tools/preprocess_data.py on several JSON-lines files, which resumes from its
  last committed chunk;
* ``restart``: ``torchrun --max-restarts`` with two ranks; a rank (not the launcher) is killed
  and torchrun brings the job back, resuming from the newest complete checkpoint by itself.

Afterwards every logged loss and every tensor of the final checkpoint (model and optimizer)
must equal the uninterrupted reference's bit for bit, the preprocessed ``.bin``/``.idx`` byte
for byte, and no kill may cost more than ``SAVE_INTERVAL`` steps. The report gives the kills
per phase, the steps lost per kill and the mismatches, and the seeds to replay any trial.
Exit status: 0 when every trial matched, 1 on any mismatch or failed run, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Outcome, children_of, kill_plan, run_once, run_with_kills  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
KINDS = ("train", "convert", "preprocess", "restart")
STEPS = 12
SAVE_INTERVAL = 3
CONVERT_AT = 6  # the convert kind resumes the train reference's global_step6 with ZeRO-2
TOKENIZER = REPO / "tests" / "fixtures" / "bloom-bpe-4k" / "tokenizer.json"
PREPROCESS_INPUTS = [REPO / "data" / "corpus" / "natural" / f"{lang}.jsonl.gz" for lang in ("fr", "es", "pt", "ar")]
RESUMED = re.compile(r"resuming from checkpoint \S+ \(iteration (\d+)\)|no checkpoint in \S+: starting from scratch")
PREPROCESS_RESUMED = re.compile(r"preprocess: resuming \S+ after (\d+) committed documents")


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", help="comma-separated trial seeds (fixed: CI); trial i runs kind i mod #kinds")
    seeds.add_argument("--trials", type=int, help="this many trials with fresh random seeds (printed for replay)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"kinds of runs to cycle through ({', '.join(KINDS)})")
    p.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a new one under /tmp); "
                                                              "kept on failure for inspection")
    p.add_argument("--report", type=Path, default=None, help="also write the report as JSON here")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds any single run may take")
    args = p.parse_args(argv)
    kinds = args.kinds.split(",")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        p.error(f"--kinds: unknown {unknown}; choose among {', '.join(KINDS)}")
    args.kinds = kinds
    if args.seeds:
        try:
            args.seed_list = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    else:
        fresh = random.SystemRandom()
        args.seed_list = [fresh.randrange(1 << 31) for _ in range(args.trials or 3)]
    return args


# -- runs ------------------------------------------------------------------------------------------


def environment() -> dict[str, str]:
    """The runs' environment: this checkout importable, one thread, no progress bars."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")  # as scripts/env.sh sets it, and why
    return env


def write_config(path: Path, data_prefix: str, checkpoints: Path, run_dir: Path, zero_stage: int = 1) -> Path:
    """A 2-layer fp32 run of ``STEPS`` steps on ``data_prefix``, saving every ``SAVE_INTERVAL``."""
    body = {
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
                  "vocab_size": 4096, "init_method_std": 0.02},
        "parallel": {"zero_stage": zero_stage},
        "training": {"micro_batch_size": 2, "global_batch_size": 4, "train_iters": STEPS, "seed": 7, "bf16": False},
        "optimizer": {"lr": 3.0e-3, "min_lr": 3.0e-4, "lr_warmup_samples": 8, "lr_decay_style": "cosine",
                      "clip_grad": 1.0},
        "data": {"tokenizer": str(TOKENIZER), "datasets": [{"name": "fr", "prefix": data_prefix, "weight": 1.0}],
                 "split": "0.9,0.1,0", "num_workers": 0},
        "checkpoint": {"save": str(checkpoints), "load": str(checkpoints), "save_interval": SAVE_INTERVAL,
                       "keep_last": None},
        "logging": {"log_interval": 1, "eval_interval": 0, "run_dir": str(run_dir), "log_level": "info"},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=1))  # JSON is YAML
    return path


def train_command(config: Path) -> list[str]:
    """pretrain_bloom.py on ``config``, one process."""
    return [sys.executable, str(REPO / "pretrain_bloom.py"), "--config", str(config)]


def torchrun_command(config: Path, ranks: int, restarts: int) -> list[str]:
    """The same under torchrun with ``ranks`` processes and automatic restarts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", f"--max-restarts={restarts}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", str(REPO / "pretrain_bloom.py"),
            "--config", str(config)]


def preprocess_command(output_prefix: Path) -> list[str]:
    """tools/preprocess_data.py over ``PREPROCESS_INPUTS``, in small committed chunks."""
    return [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", *map(str, PREPROCESS_INPUTS),
            "--tokenizer", str(TOKENIZER), "--output-prefix", str(output_prefix), "--append-eod", "--chunk-size",
            "16", "--commit-interval", "0.2", "--quiet"]


class TrainProbe:
    """A training run's phase from its files: ``conversion`` while a universal conversion is
    staged, ``save`` while a ``global_stepN.tmp-*`` exists, ``step`` once this start has logged
    a step, else ``startup``. Staging directories left by a killed start do not count: only
    those this start made (modified since it began)."""

    def __init__(self, checkpoints: Path, run_dir: Path, first_step: int = 0):
        self.checkpoints, self.metrics = checkpoints, run_dir / "metrics.jsonl"
        self.baseline, self.began = 0, 0.0
        self.first_step = first_step  # where the run starts (a resumed run: its checkpoint's step)

    def started(self) -> None:
        """A (re)start: steps logged and directories made before it are not this start's."""
        self.baseline, self.began = self._size(), time.time()

    def _size(self) -> int:
        try:
            return self.metrics.stat().st_size
        except OSError:
            return 0

    def _made_now(self, name: str) -> bool:
        try:
            return (self.checkpoints / name).stat().st_mtime >= self.began
        except OSError:
            return False

    def __call__(self) -> str:
        try:
            names = os.listdir(self.checkpoints)
        except OSError:
            names = []
        if any(n.endswith("_universal.tmp") and self._made_now(n) for n in names):
            return "conversion"
        if any(".tmp-" in n and self._made_now(n) for n in names):
            return "save"
        return "step" if self._size() > self.baseline else "startup"

    def steps_logged(self) -> Optional[int]:
        """The last step in metrics.jsonl (the run's starting step before it logged any)."""
        try:
            lines = self.metrics.read_text().splitlines()
        except OSError:
            lines = []
        steps = [json.loads(line)["step"] for line in lines if line.strip()]
        return max(steps, default=self.first_step)


class PreprocessProbe:
    """A preprocessing run is in ``preprocess`` once this start has committed progress (its
    record ``PREFIX.partial.json`` was written since it began), else in ``startup``; its
    progress is the committed document count."""

    def __init__(self, output_prefix: Path):
        self.state = Path(f"{output_prefix}.partial.json")
        self.began = 0.0

    def started(self) -> None:
        """A (re)start: records written before it are not this start's."""
        self.began = time.time()

    def __call__(self) -> str:
        try:
            return "preprocess" if self.state.stat().st_mtime >= self.began else "startup"
        except OSError:
            return "startup"

    def steps_logged(self) -> Optional[int]:
        """Documents committed so far (0 before the first commit, and after the last: the output
        is then published and the record gone)."""
        try:
            return json.loads(self.state.read_text())["documents"]
        except (OSError, ValueError, KeyError):
            return 0


# -- comparing -------------------------------------------------------------------------------------


def losses(run_dir: Path) -> dict[int, float]:
    """step -> lm loss of a run's metrics.jsonl (a step logged again after a resume: the last)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train":
            out[record["step"]] = record["lm loss"]
    return out


def tensors(value, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside a loaded checkpoint file, by its path of keys."""
    found = {}
    if isinstance(value, torch.Tensor):
        found[prefix] = value
    elif isinstance(value, dict):
        for k, v in value.items():
            found.update(tensors(v, f"{prefix}/{k}"))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found.update(tensors(v, f"{prefix}/{i}"))
    return found


def checkpoint_mismatches(reference: Path, trial: Path) -> list[str]:
    """Tensors of two checkpoint directories that are not bitwise equal (model and optimizer)."""
    problems = []
    names = sorted(p.name for p in reference.glob("*.pt"))
    if names != sorted(p.name for p in trial.glob("*.pt")):
        return [f"{trial} holds files {sorted(p.name for p in trial.glob('*.pt'))}, the reference {names}"]
    for name in names:
        # Both written by this framework in this trial: trusted (optimizer state is not weights-only).
        ours = tensors(torch.load(trial / name, map_location="cpu", weights_only=False))
        theirs = tensors(torch.load(reference / name, map_location="cpu", weights_only=False))
        if ours.keys() != theirs.keys():
            problems.append(f"{trial / name}: tensors {sorted(set(ours) ^ set(theirs))[:5]} differ in presence")
        for key in sorted(set(ours) & set(theirs)):
            a, b = ours[key], theirs[key]
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                problems.append(f"{trial / name}:{key} differs from the reference")
    return problems


def run_mismatches(reference: tuple[Path, Path], trial: tuple[Path, Path]) -> list[str]:
    """Losses and final checkpoint of a trial (run dir, checkpoint dir) against the reference's."""
    (ref_run, ref_ckpt), (run, ckpt) = reference, trial
    problems = []
    expected, got = losses(ref_run), losses(run)
    if set(got) != set(expected):
        problems.append(f"steps logged {sorted(got)} differ from the reference's {sorted(expected)}")
    problems += [f"step {s}: loss {got[s]!r} != reference {expected[s]!r}" for s in sorted(set(got) & set(expected))
                 if got[s] != expected[s]]
    final = f"global_step{STEPS}"
    problems += checkpoint_mismatches(ref_ckpt / final, ckpt / final)
    return problems


def resume_points(outcome: Outcome, pattern: re.Pattern, per_log: bool, silent: Optional[int]) -> list:
    """Where each start began, in order, from the runs' logs. ``per_log``: one start per log, and
    a log without the pattern says ``silent`` (preprocessing says nothing when it starts afresh;
    a training start killed before it said where it resumed: None). Else (torchrun: every
    round in one log) the matches in order."""
    texts = [p.read_text(errors="replace") for p in outcome.logs if p.exists()]
    if per_log:
        found = [pattern.search(t) for t in texts]
        return [(int(m.group(1)) if m.group(1) else 0) if m else silent for m in found]
    return [int(m.group(1)) if m.group(1) else 0 for m in pattern.finditer("".join(texts))]


def fill_in_resumes(outcome: Outcome, pattern: re.Pattern, per_log: bool, silent: Optional[int] = None) -> None:
    """Record for each kill where the following start resumed."""
    starts = resume_points(outcome, pattern, per_log, silent)
    for i, kill in enumerate(outcome.kills):
        kill.resumed_from = starts[i + 1] if i + 1 < len(starts) else None


# -- the trials ------------------------------------------------------------------------------------


class Trials:
    """References (uninterrupted runs, made once) and the trials compared with them."""

    def __init__(self, workdir: Path, timeout: float):
        self.workdir, self.timeout, self.env = workdir, timeout, environment()
        self.references: dict[str, tuple] = {}
        self.seconds: dict[str, float] = {}

    def _reference_run(self, name: str, command: list[str], log: Path) -> None:
        start = time.monotonic()
        status = run_once(command, self.env, log, self.timeout)
        self.seconds[name] = time.monotonic() - start
        if status != 0:
            raise RuntimeError(f"the uninterrupted {name} run failed with exit status {status}: see {log}")

    def data_prefix(self) -> str:
        """The training data: the uninterrupted preprocessing run's output."""
        if "preprocess" not in self.references:
            out = self.workdir / "reference" / "preprocess" / "corpus"
            out.parent.mkdir(parents=True, exist_ok=True)
            self._reference_run("preprocess", preprocess_command(out), out.parent / "run.log")
            self.references["preprocess"] = (out,)
        return f"{self.references['preprocess'][0]}_text_document"

    def reference(self, kind: str) -> tuple:
        """(run dir, checkpoint dir) of the uninterrupted run for ``kind``."""
        if kind in self.references:
            return self.references[kind]
        root = self.workdir / "reference" / kind
        if kind == "train":
            config = write_config(root / "config.json", self.data_prefix(), root / "checkpoints", root / "run")
            self._reference_run(kind, train_command(config), root / "run.log")
        elif kind == "convert":
            self.reference("train")
            self._seed_conversion(root / "checkpoints")
            config = write_config(root / "config.json", self.data_prefix(), root / "checkpoints", root / "run", 2)
            self._reference_run(kind, train_command(config), root / "run.log")
        elif kind == "restart":
            config = write_config(root / "config.json", self.data_prefix(), root / "checkpoints", root / "run")
            self._reference_run(kind, torchrun_command(config, ranks=2, restarts=0), root / "run.log")
        self.references[kind] = (root / "run", root / "checkpoints")
        return self.references[kind]

    def _seed_conversion(self, checkpoints: Path) -> None:
        """A checkpoint directory holding the train reference's ZeRO-1 global_step{CONVERT_AT}."""
        source = self.workdir / "reference" / "train" / "checkpoints"
        checkpoints.mkdir(parents=True)
        tag = f"global_step{CONVERT_AT}"
        if not (source / tag).is_dir():
            raise RuntimeError(f"{source / tag} is missing: the train reference must keep it (keep_last)")
        shutil.copytree(source / tag, checkpoints / tag)
        (checkpoints / "latest").write_text(tag)

    def trial(self, index: int, kind: str, seed: int) -> dict:
        """Run trial ``index`` of ``kind`` with ``seed``; its report entry."""
        rng = random.Random(seed)
        kills = rng.randint(1, 3)
        root = self.workdir / f"trial{index}-{kind}-seed{seed}"
        if kind == "preprocess":
            self.data_prefix()
            out = root / "corpus"
            root.mkdir(parents=True)
            probe = PreprocessProbe(out)
            outcome = run_with_kills(preprocess_command(out), self.env, root / "logs", probe,
                                     kill_plan(rng, kills, ["preprocess"]), rng, self.seconds["preprocess"],
                                     progress=probe.steps_logged, timeout=self.timeout, seed=seed,
                                     on_start=probe.started)
            fill_in_resumes(outcome, PREPROCESS_RESUMED, per_log=True, silent=0)
            reference = self.references["preprocess"][0]
            problems = [f"{out}_text_document{ext} differs from the uninterrupted run's"
                        for ext in (".bin", ".idx")
                        if Path(f"{out}_text_document{ext}").read_bytes() != Path(
                            f"{reference}_text_document{ext}").read_bytes()]
            lost_limit = None
        else:
            reference = self.reference(kind)
            checkpoints, run_dir = root / "checkpoints", root / "run"
            if kind == "convert":
                self._seed_conversion(checkpoints)
            config = write_config(root / "config.json", self.data_prefix(), checkpoints, run_dir,
                                  2 if kind == "convert" else 1)
            probe = TrainProbe(checkpoints, run_dir, CONVERT_AT if kind == "convert" else 0)
            phases = {"train": ["save", "step", "startup"], "convert": ["conversion", "step", "save"],
                      "restart": ["step", "save"]}[kind]
            if kind == "restart":
                command = torchrun_command(config, ranks=2, restarts=kills)

                def victim(process):  # one rank, never the launcher
                    ranks = children_of(process.pid)
                    return rng.choice(ranks) if len(ranks) == 2 else None
                restart = False
            else:
                command, victim, restart = train_command(config), (lambda p: p.pid), True
            # torchrun's rounds share one log, read in order: each round is killed after it said where it
            # resumed (a step or a save), so that every kill is matched with the round after it.
            plan = kill_plan(rng, kills, phases, random_times=kind != "restart")
            outcome = run_with_kills(command, self.env, root / "logs", probe, plan, rng,
                                     self.seconds[kind],
                                     victim=victim, progress=probe.steps_logged, restart=restart,
                                     timeout=self.timeout, seed=seed, on_start=probe.started)
            fill_in_resumes(outcome, RESUMED, per_log=restart)
            problems = [] if outcome.returncode == 0 else [f"the run ended with exit status {outcome.returncode}"]
            problems += run_mismatches(reference, (run_dir, checkpoints))
            lost_limit = SAVE_INTERVAL
        for kill in outcome.kills:
            if lost_limit is not None and kill.progress is not None and kill.resumed_from is not None:
                lost = kill.progress - kill.resumed_from
                if lost > lost_limit:
                    problems.append(f"kill at attempt {kill.attempt} lost {lost} steps (> save_interval "
                                    f"{lost_limit})")
        return {"trial": index, "kind": kind, **outcome.as_dict(), "mismatches": problems}


def steps_lost(entry: dict) -> list[Optional[int]]:
    """Steps (documents, for preprocessing) redone after each kill of a trial."""
    return [k["progress"] - k["resumed_from"] if k["progress"] is not None and k["resumed_from"] is not None else None
            for k in entry["kills"]]


def summary(entries: list[dict], seconds: float) -> str:
    """The human-readable report."""
    phases = Counter(k["phase"] for e in entries for k in e["kills"])
    lines = [f"{len(entries)} trials, {sum(len(e['kills']) for e in entries)} kills in {seconds:.0f} s; "
             f"kills per phase: {dict(sorted(phases.items()))}"]
    for e in entries:
        status = "ok" if not e["mismatches"] else f"{len(e['mismatches'])} MISMATCHES"
        unit = "documents" if e["kind"] == "preprocess" else "steps"
        lines.append(f"  trial {e['trial']} {e['kind']:<10} seed {e['seed']:<11} kills "
                     f"{[k['phase'] for k in e['kills']]} {unit} lost {steps_lost(e)} attempts {e['attempts']} "
                     f"{e['seconds']:.0f} s: {status}")
        lines += [f"      {m}" for m in e["mismatches"][:10]]
    mismatched = [e for e in entries if e["mismatches"]]
    lines.append("all trials equal their uninterrupted runs" if not mismatched else
                 f"{len(mismatched)} trials differ; replay with --seeds {','.join(str(e['seed']) for e in mismatched)} "
                 f"--kinds KIND")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    workdir = args.workdir or Path(f"/tmp/fault-trials-{os.getpid()}")
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"fault trials in {workdir}, seeds {args.seed_list} (replay: --seeds {','.join(map(str, args.seed_list))})",
          flush=True)
    trials, start, entries = Trials(workdir, args.timeout), time.monotonic(), []
    try:
        for i, seed in enumerate(tqdm(args.seed_list, desc="trials", disable=not sys.stderr.isatty())):
            kind = args.kinds[i % len(args.kinds)]
            try:
                entries.append(trials.trial(i, kind, seed))
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
                entries.append({"trial": i, "kind": kind, "seed": seed, "kills": [], "attempts": 0, "seconds": 0,
                                "mismatches": [f"the trial could not run: {exc}"]})
            print(summary(entries[-1:], 0).splitlines()[1], flush=True)
    except KeyboardInterrupt:
        print(f"interrupted; scratch files kept in {workdir}", file=sys.stderr)
        return 130
    report = summary(entries, time.monotonic() - start)
    print(report)
    print(f"reference runs (s): { {k: round(v, 1) for k, v in trials.seconds.items()} }")
    if args.report:
        args.report.write_text(json.dumps({"references_seconds": trials.seconds, "trials": entries}, indent=1))
    failed = any(e["mismatches"] for e in entries)
    if failed:
        print(f"scratch files kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
