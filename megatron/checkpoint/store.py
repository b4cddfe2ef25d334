"""The checkpoint directory on disk: atomic commits, completeness checks, discovery, retention.

A checkpoint is complete when its directory is named ``global_stepN`` and its
``manifest.json`` lists every file with its size and CRC32, and the files on disk still match,
and every ``.pt`` file's pickle passes the allow-list scan (megatron/checkpoint/pickle_scan.py).
Two depths of checking (``checkpoint.verify``): ``fast`` compares sizes and reads each torch
file's zip directory (kilobytes per file); ``full`` also recomputes every file's CRC32, which
reads every byte and so catches a bit flipped inside a tensor (cost per GB: bench/README.md). A
directory Megatron-DeepSpeed wrote (no manifest) is complete when every file its layout implies
is there and passes the scan (megatron/checkpoint/megatron_deepspeed.py).
Saving makes that true atomically:

1. every rank writes into ``global_stepN.tmp-<id>`` (a name no reader ever loads);
2. after a barrier, rank 0 fsyncs the files, writes the manifest last, renames the
   directory to ``global_stepN``, fsyncs its parent and then replaces ``latest``: the
   durability rule of megatron/utils/atomic.py, for a directory and for single files.

A process killed at any point therefore leaves either the previous checkpoint as the newest
complete one, or the new one fully written. Readers never trust ``latest`` alone: they pick the
newest directory whose manifest checks out, so a checkpoint truncated later (a full disk, a
copy interrupted) is reported and skipped, never half loaded.

fsync from rank 0 covers files written by other processes of the same node (one page cache);
on a multi-node parallel file system (Lustre, GPFS) the writers' ``close`` already made the data
visible to rank 0, which is what the manifest's sizes then check.

Only rank 0 calls the functions that change the directory; every rank may read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Optional

from megatron.checkpoint import megatron_deepspeed
from megatron.checkpoint.layout import (
    LATEST_FILE,
    LATEST_ITERATION_FILE,
    MANIFEST_FILE,
    TAG_PREFIX,
    UNIVERSAL_FAILED_SUFFIX,
    UNIVERSAL_STAGING_SUFFIX,
    checkpoint_tag,
    iteration_of,
    universal_tag,
)
from megatron.checkpoint.pickle_scan import scan_file
from megatron.errors import CheckpointError, UntrustedCheckpointError
from megatron.utils.atomic import atomic_write_text, fsync_path, fsync_tree

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "megatron-bloom-checkpoint"
MANIFEST_VERSION = 1
_TEMPORARY_MARKERS = (".tmp-", ".deleting-", ".replaced-")
CHECKSUM_ALGORITHM = "crc32"  # zlib's: in the standard library, ~1 GB/s per core
_READ_CHUNK = 16 << 20
VERIFY_MODES = ("fast", "full")


@dataclass
class CheckpointInfo:
    """A complete checkpoint as its manifest describes it."""

    directory: Path  # the save/load directory holding ``global_stepN``
    tag: str
    iteration: int
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        """The ``global_stepN`` directory."""
        return self.directory / self.tag


def write_latest(directory: str | os.PathLike, tag: str) -> None:
    """Point ``directory/latest`` at ``tag``, atomically; all an import or a layer-files-only
    checkpoint needs (see :meth:`CheckpointStore.write_latest` for a training checkpoint)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(directory) / LATEST_FILE, tag)


def new_temporary_tag(tag: str) -> str:
    """A fresh name to write checkpoint ``tag`` under until it is complete."""
    return f"{tag}.tmp-{uuid.uuid4().hex[:12]}"


# -- checking one checkpoint --------------------------------------------------------------------


def check_torch_file(path: Path) -> Optional[str]:
    """Why ``path`` is not an intact ``torch.save`` archive, or None when it is.

    Reads the zip directory at the end of the file (a truncated or zero-filled file has none)
    and the pickle record, whose CRC the zip format checks. Nothing is unpickled, so this is
    safe on files of unknown origin and costs a few kilobytes per file, not a full read.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
            if not pickles:
                return "holds no pickle record (not a torch.save file)"
            archive.read(pickles[0])
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        return f"is not a readable torch.save archive ({exc})"
    return None


def file_crc32(path: Path) -> int:
    """CRC32 (zlib) of a file's bytes, read in 16 MiB chunks."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def damaged_torch_records(path: Path) -> list[str]:
    """Records of a ``torch.save`` archive whose bytes no longer match the CRC32 the zip format
    stores for each (a tensor's storage is one record, ``<archive>/data/<key>``): names what a
    file-level checksum mismatch hit. Empty when the archive cannot tell."""
    damaged = []
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                try:
                    with archive.open(info) as record:
                        while record.read(_READ_CHUNK):
                            pass
                except zipfile.BadZipFile:
                    damaged.append(info.filename)
    except (zipfile.BadZipFile, OSError, ValueError):
        return []
    return damaged


def has_checksums(manifest: dict[str, Any]) -> bool:
    """Whether a manifest records checksums (manifests of older versions hold sizes only)."""
    return manifest.get("checksums", {}).get("algorithm") == CHECKSUM_ALGORITHM


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint directory ``path``; raises CheckpointError (a ValueError) naming
    the file and the problem, also for a manifest whose fields have the wrong types."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path} is missing: the save was interrupted, or the directory was not "
                              "written by this framework")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, bad UTF-8
        raise CheckpointError(f"{manifest_path} is unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{manifest_path} is not a {MANIFEST_FORMAT} manifest")
    _check_manifest_fields(manifest_path, manifest)
    if manifest.get("version", 0) > MANIFEST_VERSION:
        raise CheckpointError(f"{manifest_path} has manifest version {manifest.get('version')}, newer than this "
                              f"code understands ({MANIFEST_VERSION}): update the code")
    return manifest


def _check_manifest_fields(manifest_path: Path, manifest: dict[str, Any]) -> None:
    """The types the readers of a manifest rely on; an edited or damaged one fails here, with
    the field named, rather than deep inside a resume."""
    def bad(field: str, wanted: str) -> CheckpointError:
        return CheckpointError(f"{manifest_path}: '{field}' must be {wanted}; the manifest was edited or damaged: "
                               "restore it, or move this checkpoint away")

    if not isinstance(manifest.get("version", 0), int) or isinstance(manifest.get("version"), bool):
        raise bad("version", "an integer")
    for key in ("files", "layout", "train_state", "schedule", "config", "checksums"):
        if not isinstance(manifest.get(key, {}), dict):
            raise bad(key, "a mapping")
    for name, size in manifest.get("files", {}).items():
        inside = name and not PurePosixPath(name).is_absolute() and ".." not in PurePosixPath(name).parts
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not inside:
            raise bad(f"files.{name}", "a byte count (a path inside this directory mapped to an integer >= 0)")
    for section, values in manifest.get("config", {}).items():
        if not isinstance(values, dict):
            raise bad(f"config.{section}", "a mapping")
    checksums = manifest.get("checksums", {}).get("files", {})
    if not isinstance(checksums, dict):
        raise bad("checksums.files", "a mapping")
    for name, crc in checksums.items():
        if not isinstance(crc, int) or isinstance(crc, bool) or not 0 <= crc < 2**32:
            raise bad(f"checksums.files.{name}", "a CRC32 (an integer in [0, 2^32))")


def verify_checkpoint(path: Path, mode: str = "fast") -> list[str]:
    """Problems that make checkpoint directory ``path`` unusable (empty when it is complete).

    ``mode`` "fast": sizes, torch files' zip directories and the pickle scan; "full": also every
    file's CRC32 against the manifest (a manifest written before checksums were recorded gets the
    fast check only: :func:`has_checksums` tells which).
    """
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify mode must be one of {VERIFY_MODES}, got {mode!r}")
    try:
        manifest = read_manifest(path)
    except CheckpointError as exc:
        return [str(exc)]
    problems = (check_file(path, name, manifest, mode) for name in manifest.get("files", {}))
    return [p for p in problems if p]


def check_file(path: Path, name: str, manifest: dict[str, Any], mode: str = "fast") -> Optional[str]:
    """Why file ``name`` of checkpoint directory ``path`` does not match ``manifest`` (None: it does),
    at depth ``mode`` (see :func:`verify_checkpoint`)."""
    file = path / name
    if not file.is_file():
        return f"{file} is missing"
    actual, size = file.stat().st_size, manifest["files"][name]
    if actual != size:
        return f"{file} has {actual} bytes but the manifest records {size}: it was truncated or overwritten"
    if file.suffix == ".pt":
        problem = check_torch_file(file)
        if problem:
            return f"{file} {problem}"
    expected = manifest.get("checksums", {}).get("files", {}).get(name) if mode == "full" else None
    if expected is not None:
        actual_crc = file_crc32(file)
        if actual_crc != expected:
            records = damaged_torch_records(file) if file.suffix == ".pt" else []
            where = f" (damaged records: {', '.join(records)})" if records else ""
            return (f"{file} has CRC32 {actual_crc:08x} but the manifest records {expected:08x}{where}: its bytes "
                    "changed after the save (bad disk, memory or copy); restore it from a copy, or delete the "
                    "checkpoint to resume from an older one")
    if file.suffix == ".pt":
        try:
            scan_file(file)  # before DeepSpeed unpickles it with weights_only=False
        except UntrustedCheckpointError as exc:
            return str(exc)
    return None


# -- the directory of checkpoints ---------------------------------------------------------------


class CheckpointStore:
    """One directory of ``global_stepN`` checkpoints (``checkpoint.save`` or ``checkpoint.load``)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def tags(self) -> list[str]:
        """Names of ``global_stepN`` directories, newest first (complete or not)."""
        if not self.directory.is_dir():
            return []
        found = [(iteration_of(p.name), p.name) for p in self.directory.iterdir() if p.is_dir()]
        return [tag for it, tag in sorted((f for f in found if f[0] is not None), reverse=True)]

    def leftovers(self) -> list[Path]:
        """Directories of interrupted saves or deletions (``global_stepN.tmp-*`` ...)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir()
                      if p.is_dir() and p.name.startswith(TAG_PREFIX) and any(m in p.name for m in _TEMPORARY_MARKERS))

    def find_newest_complete(self, verify: str = "fast") -> tuple[Optional[CheckpointInfo], list[str]]:
        """The newest checkpoint that passes :func:`verify_checkpoint` (at depth ``verify``), and a
        report line for every newer one that was skipped (and for leftovers of interrupted saves)."""
        report = [f"ignoring {p}: an interrupted save or deletion (no complete checkpoint there)"
                  for p in self.leftovers() if ".tmp-" in p.name]
        for tag in self.tags():
            path = self.directory / tag
            if megatron_deepspeed.is_megatron_deepspeed_checkpoint(path):
                # Written by Megatron-DeepSpeed itself (e.g. BLOOM's): its files, not a manifest, tell.
                problems = megatron_deepspeed.verify(path)
                if not problems:
                    return CheckpointInfo(self.directory, tag, iteration_of(tag), megatron_deepspeed.describe(path)), \
                        report
            else:
                problems = verify_checkpoint(path, verify)
                if not problems:
                    manifest = read_manifest(path)
                    return CheckpointInfo(self.directory, tag, iteration_of(tag), manifest), report
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            report.append(f"skipping checkpoint {path}: {shown}. It will not be loaded; delete it once you have "
                          "looked at it")
        return None, report

    def latest_tag(self) -> Optional[str]:
        """The tag named in ``latest`` (a hint only: readers verify before trusting it)."""
        try:
            return (self.directory / LATEST_FILE).read_text(encoding="utf-8").strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    # -- writing (rank 0 only) -----------------------------------------------------------------

    def remove_leftovers(self, keep: Iterable[str] = ()) -> list[Path]:
        """Delete directories of interrupted saves and deletions, except the names in ``keep``."""
        keep = set(keep)
        removed = [p for p in self.leftovers() if p.name not in keep]
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        return removed

    def discard(self, temporary_tag: str) -> None:
        """Remove the partial checkpoint ``temporary_tag`` (a failed save); renamed first, so a
        process killed halfway leaves a ``.deleting-`` leftover, never a ``.tmp-`` one to wonder about."""
        path = self.directory / temporary_tag
        if path.exists():
            doomed = path.with_name(f"{temporary_tag.split('.tmp-')[0]}.deleting-{uuid.uuid4().hex[:8]}")
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def commit(self, temporary_tag: str, tag: str, metadata: dict[str, Any]) -> CheckpointInfo:
        """Turn the fully written ``temporary_tag`` directory into checkpoint ``tag``.

        fsyncs every file, writes ``manifest.json`` (files, sizes, CRC32s and ``metadata``) last, renames
        the directory, then points ``latest`` at it. An existing directory of the same name (a
        step saved again after resuming from an older checkpoint) is replaced.
        """
        staging = self.directory / temporary_tag
        files, checksums = {}, {}
        for file in fsync_tree(staging):
            name = file.relative_to(staging).as_posix()
            files[name] = file.stat().st_size
            # Read back after the fsync: the checksum is of what the disk holds, as far as the
            # page cache tells; a flip before this point would need the writer's own CRCs.
            checksums[name] = file_crc32(file)
        manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "tag": tag,
                    "iteration": iteration_of(tag), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    **metadata, "files": files,
                    "checksums": {"algorithm": CHECKSUM_ALGORITHM, "files": checksums}}
        atomic_write_text(staging / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=False) + "\n")
        final = self.directory / tag
        replaced = None
        if final.exists():
            replaced = final.with_name(f"{tag}.replaced-{uuid.uuid4().hex[:8]}")
            os.rename(final, replaced)
        os.rename(staging, final)
        fsync_path(self.directory)
        self.write_latest(tag)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        return CheckpointInfo(self.directory, tag, iteration_of(tag), manifest)

    def write_latest(self, tag: str) -> None:
        """Point ``latest`` (DeepSpeed) and ``latest_checkpointed_iteration.txt`` (Megatron) at ``tag``."""
        write_latest(self.directory, tag)
        atomic_write_text(self.directory / LATEST_ITERATION_FILE, str(iteration_of(tag)))

    def apply_retention(self, keep_last: Optional[int], keep_every: Optional[int]) -> list[str]:
        """Delete complete checkpoints beyond the newest ``keep_last``, except multiples of
        ``keep_every``; returns the deleted tags. Incomplete ones are left for inspection."""
        # A readable manifest is enough here: the full check of every file is for loading.
        complete = [iteration_of(tag) for tag in self.tags() if _has_manifest(self.directory / tag)]
        doomed = checkpoints_to_delete(complete, keep_last, keep_every)
        for iteration in doomed:
            self.delete(checkpoint_tag(iteration))
        return [checkpoint_tag(i) for i in doomed]

    def delete(self, tag: str) -> None:
        """Remove checkpoint ``tag`` (and its universal conversion, finished or not): renamed first,
        so a process killed halfway leaves a leftover rather than a broken ``global_stepN``."""
        for name in (tag, universal_tag(tag), universal_tag(tag) + UNIVERSAL_STAGING_SUFFIX):
            path = self.directory / name
            if path.exists():
                doomed = path.with_name(f"{name}.deleting-{uuid.uuid4().hex[:8]}")
                os.rename(path, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
        (self.directory / (universal_tag(tag) + UNIVERSAL_FAILED_SUFFIX)).unlink(missing_ok=True)


def _has_manifest(path: Path) -> bool:
    try:
        read_manifest(path)
    except ValueError:
        return False
    return True


def checkpoints_to_delete(iterations: Iterable[int], keep_last: Optional[int], keep_every: Optional[int]) -> list[int]:
    """Iterations to delete so that the newest ``keep_last`` remain plus every multiple of
    ``keep_every`` (None: keep all; the newest is always kept)."""
    ordered = sorted(set(iterations), reverse=True)
    if keep_last is None:
        return []
    keep = set(ordered[: max(keep_last, 1)])
    if keep_every:
        keep.update(i for i in ordered if i % keep_every == 0)
    return sorted(i for i in ordered if i not in keep)
