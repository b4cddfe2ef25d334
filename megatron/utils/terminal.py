"""Whether to draw progress bars: only on a terminal.

In a SLURM log or behind ``| tee`` a bar's carriage returns turn into thousands of partial lines;
there the tools and the trainer print occasional plain lines instead (or nothing).
"""

from __future__ import annotations

import sys


def show_progress(quiet: bool = False) -> bool:
    """True when a progress bar should be drawn: not asked to be quiet, and stderr is a terminal."""
    return not quiet and sys.stderr.isatty()
