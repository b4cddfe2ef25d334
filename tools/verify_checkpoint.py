#!/usr/bin/env python3
"""Check checkpoints offline against their manifests, without loading or unpickling anything.

    python tools/verify_checkpoint.py checkpoints/bloom-560m              # every global_stepN
    python tools/verify_checkpoint.py checkpoints/bloom-560m/global_step1000 --mode fast

``full`` (the default) recomputes every file's CRC32 and compares it with the one the manifest
recorded at save time, so a bit flipped inside a tensor since then is found and the file (and
its damaged zip record, one tensor storage) named; it reads every byte (about 1 GB/s per core,
see bench/README.md). ``fast`` checks what a run checks at start-up by default: every file is
there with its recorded size and each torch file's zip directory is readable.

Leftovers of interrupted saves (``global_stepN.tmp-*``) are listed, not checked: no run loads
them. Exit status: 0 when every checked checkpoint is intact, 1 when any is not (each problem
printed), 2 on bad arguments or a path holding no checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

try:
    from megatron.checkpoint.layout import iteration_of
    from megatron.checkpoint.store import VERIFY_MODES, CheckpointStore, check_file, has_checksums, read_manifest
    from megatron.utils.terminal import show_progress
except ImportError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from megatron.checkpoint.layout import iteration_of
    from megatron.checkpoint.store import VERIFY_MODES, CheckpointStore, check_file, has_checksums, read_manifest
    from megatron.utils.terminal import show_progress


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="a save directory (checks every global_stepN) or one global_stepN")
    parser.add_argument("--mode", choices=VERIFY_MODES, default="full",
                        help="full: CRC32 of every byte (default); fast: sizes and zip directories")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (none either off a terminal)")
    return parser.parse_args(argv)


def checkpoints_under(path: Path) -> list[Path]:
    """The ``global_stepN`` directories ``path`` names: itself, or those it holds, oldest first."""
    if iteration_of(path) is not None:
        return [path]
    store = CheckpointStore(path)
    for leftover in store.leftovers():
        print(f"not checked: {leftover} (an interrupted save or deletion; no run loads it)")
    return [path / tag for tag in reversed(store.tags())]


def verify(checkpoint: Path, mode: str, progress: bool) -> list[str]:
    """Problems of one checkpoint directory, checking its files one by one with a progress bar."""
    try:
        manifest = read_manifest(checkpoint)
    except ValueError as exc:
        return [str(exc)]
    files = manifest.get("files", {})
    if mode == "full" and not has_checksums(manifest):
        print(f"{checkpoint}: its manifest records no checksums (written by an older version): size checks only")
    problems = []
    with tqdm(total=sum(files.values()), unit="B", unit_scale=True, desc=checkpoint.name, disable=not progress,
              file=sys.stderr) as bar:
        for name, size in files.items():
            problem = check_file(checkpoint, name, manifest, mode)
            if problem:
                problems.append(problem)
            bar.update(size)
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    if not args.path.is_dir():
        print(f"error: {args.path} is not a directory: give a checkpoint save directory or a global_stepN folder",
              file=sys.stderr)
        return 2
    checkpoints = checkpoints_under(args.path)
    if not checkpoints:
        print(f"error: {args.path} holds no global_stepN checkpoint", file=sys.stderr)
        return 2
    bad = 0
    for checkpoint in checkpoints:
        problems = verify(checkpoint, args.mode, show_progress(args.quiet))
        if problems:
            bad += 1
            print(f"BROKEN {checkpoint}:")
            for problem in problems:
                print(f"  {problem}")
        else:
            print(f"ok {checkpoint} ({args.mode})")
    if bad:
        print(f"{bad} of {len(checkpoints)} checkpoints are broken; a run skips them and resumes from the newest "
              "intact one", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
