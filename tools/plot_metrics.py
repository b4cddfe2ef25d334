#!/usr/bin/env python
"""Plot a run's loss curves from its ``metrics.jsonl`` into a PNG.

    python tools/plot_metrics.py runs/tiny/metrics.jsonl --output runs/tiny/loss.png

Left: training loss and overall validation loss against consumed tokens. Right: validation
loss per language group (BLOOM's groups: Indic, Niger-Congo, Romance, code, ...), each the
mean over the languages of that group that were evaluated.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from megatron.data.languages import UnknownLanguageError, get_language
from megatron.training.logging import read_metrics
from megatron.utils.atomic import atomic_path


def group_curves(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Per language group: (steps, mean validation loss over the group's languages)."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        if record["kind"] != "valid":
            continue
        by_group: dict[str, list[float]] = defaultdict(list)
        for key, value in record.items():
            if key.startswith("validation/") and key.endswith(" loss"):
                code = key[len("validation/"):-len(" loss")]
                try:
                    group = get_language(code).group
                except UnknownLanguageError:
                    group = "other"
                by_group[group].append(value)
        for group, values in by_group.items():
            steps, losses = curves.setdefault(group, ([], []))
            steps.append(record["step"])
            losses.append(sum(values) / len(values))
    return curves


def plot(records: list[dict], output: Path, title: str) -> None:
    """Draw the two panels and write ``output`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["kind"] == "train" and "lm loss" in r]
    valid = [r for r in records if r["kind"] == "valid" and "validation loss" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    left.plot([r["step"] for r in train], [r["lm loss"] for r in train], label="train", lw=1)
    left.plot([r["step"] for r in valid], [r["validation loss"] for r in valid], "o-", label="validation (blend)")
    left.set(xlabel="iteration", ylabel="lm loss", title=title)
    left.legend()
    left.grid(alpha=0.3)
    for group, (steps, losses) in sorted(group_curves(records).items()):
        right.plot(steps, losses, "o-", ms=3, label=group)
    right.set(xlabel="iteration", ylabel="validation loss", title="validation loss per language group")
    right.legend(fontsize=8, ncol=2)
    right.grid(alpha=0.3)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, dpi=110, format="png")  # the temporary's name has no extension to go by
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path, help="metrics.jsonl written by pretrain_bloom.py")
    parser.add_argument("--output", type=Path, default=None, help="PNG to write (default: next to the metrics)")
    parser.add_argument("--title", default=None, help="title of the left panel")
    args = parser.parse_args(argv)
    if not args.metrics.is_file():
        print(f"error: {args.metrics} does not exist", file=sys.stderr)
        return 1
    records = read_metrics(args.metrics)
    if not any(r["kind"] == "train" for r in records):
        print(f"error: {args.metrics} has no training records", file=sys.stderr)
        return 1
    output = args.output or args.metrics.with_name("loss.png")
    plot(records, output, args.title or str(args.metrics.parent))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
