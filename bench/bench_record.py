"""What every benchmark result records about where it ran, and how the record is written.

The machine part is the subset of a run's environment.json (megatron/training/environment.py)
that applies to a benchmark, plus the load at the start: on a shared machine the ratios measured
in one run are what to compare, and the load says how noisy the absolute times are.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def describe_machine() -> dict[str, Any]:
    """CPU, cores, threads, host allocator, memory, load, versions and the git state of the checkout."""
    import torch

    from megatron.training.environment import PACKAGES, device_name, git_state, host_allocator, package_version
    from megatron.training.precision import CpuBf16Support

    return {"cpu": device_name(torch.device("cpu")), "cpu_count": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu_features": dataclasses.asdict(CpuBf16Support.detect()),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "host_allocator": host_allocator(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "load_average_at_start": os.getloadavg(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": str(torch.__version__),
            "packages": {name: package_version(name) for name in PACKAGES},
            "git": git_state(ROOT)}


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` as JSON to ``path`` atomically and say so."""
    from megatron.utils.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


def drop_page_cache() -> bool:
    """Write dirty pages and drop the page cache (root only), so the next reads hit the disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True
