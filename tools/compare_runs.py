#!/usr/bin/env python
"""Overlay several runs' ``metrics.jsonl``: training and validation loss against consumed tokens,
per-language validation, as a PNG and a text table.

    python tools/compare_runs.py runs/tiny runs/tiny-alpha0.5 --label baseline --label alpha=0.5 \\
        --languages fr,sw,python --output compare.png

Each RUN is a run directory (``logging.run_dir``, holding ``metrics.jsonl``) or a
``metrics.jsonl`` file. Runs are put side by side on consumed tokens, so runs with different
batch sizes or ramp-ups compare fairly (a resumed run's repeated steps count once: the last
record of a step wins, megatron.training.logging.read_metrics).

The table (stdout) lists for every run its last iteration, tokens, training loss (mean of the
last ``--window`` logged values) and validation loss and perplexity of the blend, then the last
validation loss of every language any run evaluated, one row per language, the lowest marked
``*``. The PNG (``--output``) has training loss, validation loss of the blend, and, with
``--languages``, those languages' validation loss, all against tokens; it needs matplotlib
(the ``plot`` extra).

Exit status: 0, 1 when a run cannot be read (the message names it), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

try:
    from megatron.training.logging import read_metrics
except ImportError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from megatron.training.logging import read_metrics
from megatron.utils.atomic import atomic_path


@dataclass
class Run:
    """One run's curves, on consumed tokens."""

    label: str
    path: Path
    train: list[tuple[int, float]]  # (tokens, lm loss)
    valid: dict[str, list[tuple[int, float]]]  # set ("blend" or a language) -> (tokens, loss)
    last_step: int
    last_tokens: int


def metrics_file(path: Path) -> Path:
    """The metrics.jsonl of a run directory, or the file itself."""
    return path / "metrics.jsonl" if path.is_dir() else path


def load_run(path: Path, label: Optional[str] = None) -> Run:
    """Read a run's records and put them on the token axis. Validation records carry no token
    count: they take the tokens of the training record of the same step (0 before the first)."""
    file = metrics_file(path)
    if not file.is_file():
        raise ValueError(f"{file} does not exist: pass a run directory (logging.run_dir) or its metrics.jsonl")
    try:
        records = read_metrics(file)
    except (json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{file} is not a metrics.jsonl written by pretrain_bloom.py ({err})") from None
    tokens_at = {r["step"]: r["consumed-tokens"] for r in records if r["kind"] == "train" and "consumed-tokens" in r}
    train = [(tokens_at[r["step"]], r["lm loss"]) for r in records
             if r["kind"] == "train" and r["step"] in tokens_at and _finite(r.get("lm loss"))]
    valid: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r["kind"] != "valid":
            continue
        tokens = tokens_at.get(r["step"], 0)
        for key, value in r.items():
            if key.endswith(" loss") and key.startswith("validation") and _finite(value):
                name = "blend" if key == "validation loss" else key[len("validation/"):-len(" loss")]
                valid.setdefault(name, []).append((tokens, value))
    if not train and not valid:
        raise ValueError(f"{file} has no training or validation records")
    last_step = max(r["step"] for r in records)
    return Run(label or (file.parent.name if path.is_dir() or file.name == "metrics.jsonl" else file.stem), file,
               train, valid, last_step, max(tokens_at.values(), default=0))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _fmt(value: Optional[float], digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(runs: list[Run], window: int = 5) -> str:
    """The summary and the per-language table (see the module docstring)."""

    def table(rows: list[list[str]]) -> list[str]:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 for row in rows]
        return [lines[0], "  ".join("-" * w for w in widths), *lines[1:]]

    summary = [["run", "iteration", "tokens", f"train loss (last {window})", "valid loss", "valid ppl"]]
    for run in runs:
        recent = [loss for _, loss in run.train[-window:]]
        blend = run.valid.get("blend", [])
        valid = blend[-1][1] if blend else None
        summary.append([run.label, str(run.last_step), f"{run.last_tokens:,}",
                        _fmt(sum(recent) / len(recent) if recent else None), _fmt(valid),
                        _fmt(math.exp(min(valid, 700.0)) if valid is not None else None, 2)])
    lines = table(summary)
    languages = sorted({name for run in runs for name in run.valid if name != "blend"})
    if languages:
        rows = [["language (last validation loss)", *[run.label for run in runs]]]
        for language in languages:
            last = [run.valid[language][-1][1] if language in run.valid else None for run in runs]
            best = min((v for v in last if v is not None), default=None)
            rows.append([language, *[_fmt(v) + ("*" if v is not None and v == best and len(runs) > 1 else "")
                                     for v in last]])
        lines += ["", *table(rows)]
    return "\n".join(lines)


def plot(runs: list[Run], languages: list[str], output: Path) -> None:
    """Training loss, blend validation loss and the chosen languages' validation loss vs tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if languages else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        if run.train:
            axes[0].plot(*zip(*run.train), color=color, lw=1, label=run.label)
        if run.valid.get("blend"):
            axes[1].plot(*zip(*run.valid["blend"]), "o-", ms=3, color=color, label=run.label)
        for j, language in enumerate(languages):
            if run.valid.get(language):
                axes[2].plot(*zip(*run.valid[language]), styles[j % len(styles)], marker="o", ms=3, color=color,
                             label=f"{run.label}: {language}")
    titles = ["training loss", "validation loss (blend)", "validation loss per language"]
    for ax, title in zip(axes, titles):
        ax.set(xlabel="consumed tokens", ylabel="lm loss", title=title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories or metrics.jsonl files")
    parser.add_argument("--label", action="append", default=[],
                        help="name of each run in order (default: the run directory's name)")
    parser.add_argument("--languages", default="", help="comma-separated languages to plot (e.g. fr,sw,python)")
    parser.add_argument("--window", type=int, default=5, help="logged training losses averaged in the table")
    parser.add_argument("--output", type=Path, default=None, help="PNG to write (default: no plot)")
    args = parser.parse_args(argv)
    if args.label and len(args.label) != len(args.runs):
        parser.error(f"{len(args.label)} --label for {len(args.runs)} runs: give one per run or none")
    if args.window < 1:
        parser.error("--window must be at least 1")
    try:
        runs = [load_run(path, label) for path, label in zip(args.runs, args.label or [None] * len(args.runs))]
    except (ValueError, OSError) as err:
        print(f"compare_runs: error: {err}", file=sys.stderr)
        return 1
    print(format_table(runs, args.window))
    if args.output is not None:
        languages = [x for x in args.languages.split(",") if x]
        plot(runs, languages, args.output)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
