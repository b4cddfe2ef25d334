#!/usr/bin/env python3
"""What ``checkpoint.verify: full`` costs per GB, against ``fast``, and what the checksums add to a save.

    python bench/checkpoint_verify.py                  # a 1 GiB checkpoint, best of 3
    python bench/checkpoint_verify.py --gib 4 --repeats 5

Writes a checkpoint of ``--gib`` GiB of fp32 tensors in files of 256 MiB (as ZeRO shards and
layer files are), committed by ``CheckpointStore.commit`` (fsync, CRC32 of every file, manifest),
then times:

* commit, which reads every file back for its CRC32 (the cost checksums add to a save);
* ``verify_checkpoint(..., "fast")``: sizes and zip directories, what every start does by default;
* ``verify_checkpoint(..., "full")``: also the CRC32 of every byte;
* ``zlib.crc32`` over a buffer already in memory (the ceiling: no file system).

With the page cache warm (just written) and, when run as root with ``--cold``, cold (the cache
dropped for the whole machine, which slows other jobs on a shared machine: off by default).
Results go to a table and to ``bench/results/checkpoint_verify.json``.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_record import describe_machine, write_result  # noqa: E402

FILE_BYTES = 256 << 20


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0, help="checkpoint size in GiB")
    p.add_argument("--repeats", type=int, default=3, help="timings per measure (the median is reported)")
    p.add_argument("--directory", type=Path, default=None, help="where to write it (default: a temporary directory "
                                                                "under /tmp); removed afterwards")
    p.add_argument("--cold", action="store_true", help="also time with the page cache dropped (root; affects the "
                                                       "whole machine)")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "checkpoint_verify.json")
    return p.parse_args(argv)


def write_checkpoint(directory: Path, total: int) -> tuple[str, tuple[float, float]]:
    """A committed checkpoint of ``total`` bytes of tensors; its tag and the commit's (wall, CPU) seconds."""
    import torch

    from megatron.checkpoint.store import CheckpointStore, new_temporary_tag

    store = CheckpointStore(directory)
    tag = "global_step1"
    staging = directory / new_temporary_tag(tag)
    staging.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    files = max(1, round(total / FILE_BYTES))
    for i in tqdm(range(files), desc="writing", unit="file", disable=not sys.stderr.isatty()):
        tensor = torch.randn(min(FILE_BYTES, total - i * FILE_BYTES) // 4, generator=generator)
        torch.save({"shard": tensor}, staging / f"zero_pp_rank_{i}_mp_rank_00_optim_states.pt")
    start, cpu = time.perf_counter(), time.process_time()
    store.commit(staging.name, tag, {})
    return tag, (time.perf_counter() - start, time.process_time() - cpu)


def drop_caches() -> None:
    """Write dirty pages and drop the page cache (root only)."""
    import os

    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(fn, repeats: int, before=lambda: None) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of ``repeats`` calls of ``fn`` (``before`` runs untimed ahead of each).
    On a shared machine the CPU time is the steadier measure of the work itself."""
    times = []
    for _ in range(repeats):
        before()
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        times.append((time.perf_counter() - start, time.process_time() - cpu))
    return times


def main(argv=None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    from megatron.checkpoint.store import verify_checkpoint

    total = int(args.gib * (1 << 30))
    gib = total / (1 << 30)
    machine = describe_machine()
    with tempfile.TemporaryDirectory(dir=args.directory) as scratch:
        directory = Path(scratch)
        tag, commit_seconds = write_checkpoint(directory, total)
        path = directory / tag

        def check(mode: str):
            problems = verify_checkpoint(path, mode)
            if problems:
                raise SystemExit(f"the benchmark's own checkpoint fails verification: {problems[:2]}")

        rows = {"commit (fsync + CRC32 + manifest)": [commit_seconds]}
        rows["verify fast, warm cache"] = timed(lambda: check("fast"), args.repeats)
        rows["verify full, warm cache"] = timed(lambda: check("full"), args.repeats)
        if args.cold:
            rows["verify fast, cold cache"] = timed(lambda: check("fast"), args.repeats, drop_caches)
            rows["verify full, cold cache"] = timed(lambda: check("full"), args.repeats, drop_caches)
    buffer = bytes(FILE_BYTES)  # CRC32's speed does not depend on the bytes' values
    memory = timed(lambda: zlib.crc32(buffer), args.repeats)
    rows["zlib.crc32 in memory (256 MiB)"] = [(w * total / FILE_BYTES, c * total / FILE_BYTES) for w, c in memory]

    results = {}
    print(f"checkpoint of {gib:.2f} GiB in {max(1, round(total / FILE_BYTES))} files; medians of {args.repeats}")
    print(f"{'measure':<40} {'wall s':>8} {'wall s/GiB':>10} {'CPU s/GiB':>10} {'GiB/s (CPU)':>12}")
    for name, times in rows.items():
        wall = statistics.median(t[0] for t in times)
        cpu = statistics.median(t[1] for t in times)
        results[name] = {"wall_seconds": [round(t[0], 4) for t in times],
                         "cpu_seconds": [round(t[1], 4) for t in times],
                         "wall_seconds_per_gib": round(wall / gib, 4), "cpu_seconds_per_gib": round(cpu / gib, 4),
                         "gib_per_cpu_second": round(gib / cpu, 3) if cpu else None}
        rate = f"{gib / cpu:>12.2f}" if cpu else f"{'-':>12}"
        print(f"{name:<40} {wall:>8.3f} {wall / gib:>10.3f} {cpu / gib:>10.3f} {rate}")
    write_result(args.output, {"command": shlex.join(["python", "bench/checkpoint_verify.py", *(argv or sys.argv[1:])]),
                               "gib": gib, "repeats": args.repeats, "results": results, "machine": machine})
    return 0


if __name__ == "__main__":
    sys.exit(main())
