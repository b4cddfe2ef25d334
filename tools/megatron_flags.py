#!/usr/bin/env python
"""Write (or check) docs/megatron-flags.md, the table from Megatron-DeepSpeed's flags to our config
fields, generated from megatron/config.py and megatron/config_flags.py.

    python tools/megatron_flags.py            # rewrite docs/megatron-flags.md
    python tools/megatron_flags.py --check    # exit 1 if it is stale

Exit status: 0, or 1 when ``--check`` finds the file differs from what the config generates.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    from megatron.config_flags import render_markdown
except ImportError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))
    from megatron.config_flags import render_markdown

DEFAULT_OUTPUT = REPO / "docs" / "megatron-flags.md"


def main(argv: list[str] | None = None) -> int:
    """Write or check the table; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the Markdown file (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = render_markdown()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.is_file() else None
        if current != text:
            print(f"{args.output} is stale: run python tools/megatron_flags.py", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
