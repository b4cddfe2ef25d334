#!/usr/bin/env python3
"""Convert a checkpoint to DeepSpeed's universal format, ahead of resuming it on another layout.

    python tools/convert_checkpoint.py checkpoints/bloom-176b --workers 16
    python tools/convert_checkpoint.py checkpoints/bloom-176b/global_step95000 --output /scratch/u95000

``CHECKPOINT`` is a save root (``--step N``, else ``latest``, picks the tag) or one
``global_stepN`` folder, written by this framework or by Megatron-DeepSpeed itself (BLOOM's
training checkpoints: ZeRO-1/2 or BF16_Optimizer shards). The output defaults to
``global_stepN_universal`` next to it, where a run resuming on another TP / PP / DP layout looks
first: it then skips its own conversion and only renames parameter folders for its engine.

How it works (megatron/checkpoint/universal_conversion.py): every file's pickle is checked
against an allow-list first; then each optimizer shard is memory-mapped and split into
per-parameter fragments (extract) and each parameter's fragments are merged (merge), both in
``--workers`` processes, with memory bounded by one parameter's shards, not by the model.
Progress bars show on a terminal; each phase's time is printed. Everything is written under
``OUTPUT.tmp`` and renamed when complete. Interrupted (Ctrl-C, a killed job), run the same command
again: finished shards and parameters are skipped.

Exit status: 0 on success (also when OUTPUT is already complete), 1 on an error (the message
names the file and what to do), 2 on bad arguments, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

try:
    from megatron.errors import ConversionError
    from megatron.utils.terminal import show_progress
except ImportError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from megatron.errors import ConversionError
    from megatron.utils.terminal import show_progress


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="save root or global_stepN folder")
    parser.add_argument("--step", type=int, default=None, help="convert global_step{STEP} (default: 'latest')")
    parser.add_argument("--output", default=None, help="folder to create (default: global_stepN_universal next to "
                                                       "the checkpoint)")
    parser.add_argument("--workers", type=int, default=4,
                        help="worker processes for the extract and merge phases (default 4; each holds at most "
                             "one parameter's shards)")
    parser.add_argument("--merge-workers", type=int, default=None,
                        help="worker processes for the merge phase (default: --workers); each holds up to twice one "
                             "parameter's full state (BLOOM-176B's embedding: 2 x 14.4 GB), so fewer may be wiser")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (none either off a terminal)")
    args = parser.parse_args(argv)
    if args.workers < 1 or (args.merge_workers is not None and args.merge_workers < 1):
        parser.error(f"--workers and --merge-workers must be >= 1, got {args.workers} and {args.merge_workers}")
    return args


def resolve_source(checkpoint: str, step: int | None) -> Path:
    """The ``global_stepN`` folder to convert: CHECKPOINT itself, or the tag ``--step`` or ``latest`` names."""
    from megatron.checkpoint.layout import LATEST_FILE, checkpoint_tag, iteration_of

    root = Path(checkpoint)
    if not root.is_dir():
        raise ConversionError(f"{root} is not a directory: pass a save root or a global_stepN folder")
    if iteration_of(root.name) is not None:
        if step is not None and root.name != checkpoint_tag(step):
            raise ConversionError(f"{root} is itself a checkpoint folder, not {checkpoint_tag(step)}: drop --step")
        return root
    if step is not None:
        tag = checkpoint_tag(step)
    elif (root / LATEST_FILE).is_file():
        tag = (root / LATEST_FILE).read_text(encoding="utf-8").strip()
    else:
        raise ConversionError(f"{root} has no 'latest' file: pass --step N or the global_stepN folder itself")
    source = root / tag
    if not source.is_dir():
        raise ConversionError(f"{source} does not exist; checkpoints in {root}: "
                              f"{sorted(p.name for p in root.iterdir() if iteration_of(p.name) is not None)}")
    return source


def main(argv: Sequence[str] | None = None) -> int:
    """Run the conversion; returns the exit status."""
    args = parse_args(argv)
    from megatron.checkpoint.layout import universal_tag
    from megatron.checkpoint.universal_conversion import STAGING_SUFFIX, convert_to_universal

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    output = None
    try:
        source = resolve_source(args.checkpoint, args.step)
        output = Path(args.output) if args.output else source.with_name(universal_tag(source.name))
        print(f"converting {source} to {output} with {args.workers} worker(s)", flush=True)
        report = convert_to_universal(source, output, workers=args.workers, merge_workers=args.merge_workers,
                                      progress=show_progress(args.quiet))
    except KeyboardInterrupt:
        kept = f"; the finished part is kept in {output}{STAGING_SUFFIX}: run the same command to resume" \
            if output else ""
        print(f"convert_checkpoint: interrupted{kept}", file=sys.stderr)
        return 130
    except (ConversionError, ValueError, OSError) as err:
        print(f"convert_checkpoint: error: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
