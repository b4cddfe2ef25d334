"""What a run ran on: ``{run_dir}/environment.json``, written once at start-up by rank 0.

A loss curve that differs between two runs is explained by the code, the packages, the hardware
and the precision at least as often as by the config; config.yaml records only the config. This
file records the rest, so a run can be compared or reproduced months later:

    write_environment(cfg.logging.run_dir, describe_environment(cfg, world_size, layout, device,
                                                                precision.name, precision.reason))

Collecting it never fails a run: what cannot be found (no git, a package not installed, a probe
PyTorch dropped) is recorded as null.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from megatron.utils.atomic import atomic_write_text

if TYPE_CHECKING:  # run_status.py reads the file without paying for torch's import
    import torch

    from megatron.config import Config

ENVIRONMENT_FILE = "environment.json"
# Distribution names whose versions change numerics or behaviour; torch and python come apart.
PACKAGES = ("deepspeed", "tokenizers", "datasets", "transformers", "numpy", "safetensors", "pyyaml", "tensorboard")
_LAYOUT_ALIASES = {"tensor_model_parallel_size": "tp", "pipeline_model_parallel_size": "pp",
                   "data_parallel_size": "dp"}  # Checkpointer.layout()'s names
_GIT_TIMEOUT_S = 5  # a hung network file system must not hold up the start of training


def describe_environment(cfg: "Config", world_size: int, layout: dict, device: "torch.device", precision: str,
                         precision_reason: str) -> dict[str, Any]:
    """The record for environment.json, as plain JSON-able data.

    ``layout`` holds tp, pp, dp and zero_stage (``Checkpointer.layout()``'s long names are
    accepted too); what it lacks comes from ``cfg.parallel``. ``precision`` and
    ``precision_reason`` are what was chosen at start-up and why (the config may say ``auto``).
    """
    import torch

    from megatron.training.precision import CpuBf16Support

    parallel = cfg.parallel
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    full = {"tp": tp, "pp": pp, "dp": world_size // (tp * pp), "zero_stage": parallel.zero_stage}
    full.update({_LAYOUT_ALIASES.get(key, key): value for key, value in layout.items()})
    device = torch.device(device)
    packages = {"python": platform.python_version(), "torch": str(torch.__version__), "cuda": torch.version.cuda}
    packages.update({name: package_version(name) for name in PACKAGES})
    return {
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "command": list(sys.argv),
        "git": git_state(Path(__file__).resolve().parents[2]),
        "packages": packages,
        "device": {"type": device.type, "name": device_name(device)},
        "cpu": dataclasses.asdict(CpuBf16Support.detect()),
        "host_allocator": host_allocator(),
        "precision": {"name": precision, "reason": precision_reason},
        "world_size": world_size,
        "layout": full,
    }


def host_allocator(environ: Optional[dict[str, str]] = None) -> str:
    """The host memory allocator of this process: what ``LD_PRELOAD`` loads (tcmalloc, jemalloc),
    else the C library's malloc. On CPU it changes the step time: glibc's malloc returns large
    blocks to the kernel and faults them in again every step (bench/README.md, "Host allocator")."""
    preload = (os.environ if environ is None else environ).get("LD_PRELOAD", "").strip()
    if preload:
        return f"LD_PRELOAD={preload}"
    libc = " ".join(part for part in platform.libc_ver() if part)
    return f"C library malloc ({libc})" if libc else "C library malloc"


def write_environment(run_dir: str | os.PathLike, record: dict) -> Path:
    """Write ``record`` to ``{run_dir}/environment.json`` atomically (readers such as
    ``scripts/run_status.py`` never see half a file), readable as the umask allows; returns the path."""
    path = Path(run_dir) / ENVIRONMENT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1, default=str) + "\n")
    return path


def read_environment(run_dir: str | os.PathLike) -> Optional[dict]:
    """The run's environment record, or None when the run has not written one (yet).

    Raises ValueError naming the file when it is not a JSON object.
    """
    path = Path(run_dir) / ENVIRONMENT_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot be read as JSON ({exc}); delete it, the next start writes it again") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(record).__name__}; delete it, the next "
                         "start writes it again")
    return record


def git_state(root: Path) -> dict[str, Any]:
    """``{"commit": sha, "dirty": bool}`` of the checkout at ``root``; nulls when ``root`` is not
    the top of a git checkout (an installed package inside some other repository does not count)
    or git is missing, slow or refuses (another user's repository)."""
    unknown = {"commit": None, "dirty": None}
    # No index refresh: a concurrent git command in the same checkout must not see a lock.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        head = (_git(root, env, "rev-parse", "--show-toplevel", "HEAD") or "").splitlines()
        if len(head) != 2 or Path(head[0]).resolve() != root.resolve():
            return unknown
    except (OSError, subprocess.SubprocessError):
        return unknown
    try:  # a large untracked tree can make this the slow one; the commit is still worth keeping
        status = _git(root, env, "status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        status = None
    return {"commit": head[1], "dirty": None if status is None else bool(status.strip())}


def _git(root: Path, env: dict[str, str], *args: str) -> Optional[str]:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, env=env,
                          timeout=_GIT_TIMEOUT_S, check=False)
    return done.stdout if done.returncode == 0 else None


def package_version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _probe(owner: Any, name: str, *args: Any) -> Any:
    """``owner.name(*args)``, or None when PyTorch no longer has it (private API) or it fails."""
    try:
        return getattr(owner, name)(*args)
    except Exception:  # noqa: BLE001 - a missing or broken probe is recorded as unknown
        return None


def device_name(device: "torch.device") -> Optional[str]:
    import torch

    if device.type == "cuda":
        return _probe(torch.cuda, "get_device_name", device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None
