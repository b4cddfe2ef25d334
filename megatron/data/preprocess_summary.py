"""Counts of a preprocessing run and how they are reported (console and ``--summary-json``)."""

from __future__ import annotations

import platform
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from megatron.data.document_encoder import MAX_EXAMPLES, SKIP_REASONS, Encoded


@dataclass
class Summary:
    """Counts for the final report."""

    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0
    input_bytes: int = 0
    blank_lines: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[tuple[str, str, str]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, enc: Encoded) -> None:
        """Count one encoded batch."""
        self.documents += enc.docs
        self.tokens += sum(len(v) for v in enc.ids.values())
        self.text_bytes += enc.text_bytes
        self.blank_lines += enc.blank_lines
        self.skipped.update(enc.skipped)
        self.add_examples(enc.examples)

    def add_examples(self, examples: Sequence[tuple[str, str, str]]) -> None:
        """Keep the first MAX_EXAMPLES bad records of each reason."""
        for ex in examples:
            if sum(1 for r, _, _ in self.examples if r == ex[0]) < MAX_EXAMPLES:
                self.examples.append(ex)


def format_summary(s: Summary, label: str = "") -> str:
    """The human-readable summary of one job (or of all jobs)."""
    secs = max(s.seconds, 1e-9)
    skipped = ", ".join(f"{r} {s.skipped[r]}" for r in SKIP_REASONS if s.skipped[r]) or "none"
    lines = [
        f"{label}documents {s.documents:,}  tokens {s.tokens:,}  text {s.text_bytes / 1e6:,.2f} MB  "
        f"in {s.seconds:.2f} s  ({s.text_bytes / 1e6 / secs:.2f} MB/s, {s.documents / secs:,.0f} docs/s)",
        f"{label}skipped: {skipped}" + (f"  (blank lines: {s.blank_lines})" if s.blank_lines else ""),
    ]
    for reason, loc, detail in s.examples:
        lines.append(f"{label}  {reason}: {loc}: {detail}")
    return "\n".join(lines)


def total_summary(summaries: Sequence[Summary], seconds: float) -> Summary:
    """The counts of all jobs together, over ``seconds`` of wall time."""
    tot = Summary(seconds=seconds)
    for s in summaries:
        tot.documents += s.documents
        tot.tokens += s.tokens
        tot.text_bytes += s.text_bytes
        tot.input_bytes += s.input_bytes
        tot.blank_lines += s.blank_lines
        tot.skipped.update(s.skipped)
        tot.add_examples(s.examples)
        tot.outputs += s.outputs
    return tot


def summary_dict(total: Summary, per_job: Sequence[Summary], workers: int) -> dict:
    """The ``--summary-json`` contents."""
    secs = max(total.seconds, 1e-9)
    return {
        "documents": total.documents,
        "tokens": total.tokens,
        "text_bytes": total.text_bytes,
        "input_bytes": total.input_bytes,
        "seconds": round(total.seconds, 4),
        "mb_per_s": round(total.text_bytes / 1e6 / secs, 4),
        "docs_per_s": round(total.documents / secs, 2),
        "skipped": {r: total.skipped[r] for r in SKIP_REASONS},
        "blank_lines": total.blank_lines,
        "examples": [{"reason": r, "location": loc, "detail": d} for r, loc, d in total.examples],
        "outputs": total.outputs,
        "workers": workers,
        "jobs": [
            {"output": s.outputs, "documents": s.documents, "tokens": s.tokens, "text_bytes": s.text_bytes,
             "seconds": round(s.seconds, 4)}
            for s in per_job
        ],
        "python": platform.python_version(),
    }
