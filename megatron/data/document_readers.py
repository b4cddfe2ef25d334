"""Document readers for preprocessing: JSON lines, Parquet and ``save_to_disk`` datasets.

Every reader yields :class:`Batch` objects in input order, so that the tokenized output does
not depend on how many workers encode them. A batch carries raw JSON-lines bytes (parsed and
validated in the worker, where it runs in parallel) or columns of values (already parsed by
pyarrow or ``datasets``), plus the input position reached, for the progress bar.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from megatron.errors import PreprocessError  # importable from here too

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
_MAX_BATCH_BYTES = 4 << 20  # a batch also closes at this many input bytes (bounds memory)


@dataclass
class Batch:
    """Records handed to one worker call.

    ``lines`` is raw JSON-lines bytes (``first`` = line number of its first line);
    ``columns`` maps each key to its values (``first`` = index of its first row).
    ``progress`` is the input position (bytes of the inputs on disk) after this batch.
    """

    source: str
    first: int
    lines: bytes | None = None
    columns: dict[str, list[Any]] | None = None
    progress: int = 0


def input_kind(path: Path) -> str:
    """``jsonl``, ``parquet`` or ``hf_dataset`` for an input path.

    Raises:
        PreprocessError: missing path or unknown format.
    """
    if path.is_dir():
        if any((path / n).is_file() for n in ("state.json", "dataset_dict.json", "dataset_info.json")):
            return "hf_dataset"
        raise PreprocessError(f"{path}: a directory, but not a dataset saved with datasets' save_to_disk")
    if not path.is_file():
        raise PreprocessError(f"input {path} does not exist")
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    raise PreprocessError(
        f"{path}: unknown input format; expected JSON lines ({', '.join(JSONL_SUFFIXES)}), "
        f"Parquet ({', '.join(PARQUET_SUFFIXES)}) or a save_to_disk directory"
    )


def input_size(path: Path) -> int:
    """Bytes of an input on disk (the progress bar's unit)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def checked_lines(f, path: Path) -> Iterator[bytes]:
    """The lines of binary file ``f`` (opened from ``path``); a truncated or corrupt gzip stream
    raises :class:`PreprocessError` naming the file and the line reached (gzip only notices at
    the point it breaks)."""
    lineno = 0
    try:
        for line in f:
            lineno += 1
            yield line
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise PreprocessError(
            f"{path}: the gzip stream is truncated or corrupt after line {lineno} ({exc}); nothing was written "
            "from it: re-download or re-compress the file (gzip -t checks it)"
        ) from None


def read_jsonl(path: Path, chunk_size: int, base: int) -> Iterator[Batch]:
    """Batches of raw lines of a JSON-lines file (gzip'd when the name ends in .gz)."""
    with open(path, "rb") as raw:
        f = gzip.GzipFile(fileobj=raw, mode="rb") if path.name.endswith(".gz") else raw
        lines: list[bytes] = []
        nbytes, first, lineno = 0, 1, 0
        for line in checked_lines(f, path):
            lineno += 1
            lines.append(line)
            nbytes += len(line)
            if len(lines) >= chunk_size or nbytes >= _MAX_BATCH_BYTES:
                yield Batch(str(path), first, lines=b"".join(lines), progress=base + raw.tell())
                lines, nbytes, first = [], 0, lineno + 1
        if lines:
            yield Batch(str(path), first, lines=b"".join(lines), progress=base + raw.tell())


def _check_columns(path: Path, available: Sequence[str], keys: Sequence[str]) -> None:
    missing = [k for k in keys if k not in available]
    if missing:
        raise PreprocessError(
            f"{path}: no column {', '.join(map(repr, missing))}; it has {list(available)}. "
            "Pass the right one with --json-keys."
        )


def read_parquet(path: Path, keys: Sequence[str], chunk_size: int, base: int) -> Iterator[Batch]:
    """Batches of the ``keys`` columns of a Parquet file."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    _check_columns(path, pf.schema_arrow.names, keys)
    rows, size, done = pf.metadata.num_rows, path.stat().st_size, 0
    for rb in pf.iter_batches(batch_size=chunk_size, columns=list(keys)):
        cols = {k: rb.column(k).to_pylist() for k in keys}
        first, done = done, done + rb.num_rows
        yield Batch(str(path), first, columns=cols, progress=base + (size * done // max(rows, 1)))


def read_hf_dataset(path: Path, keys: Sequence[str], chunk_size: int, base: int, split: str | None) -> Iterator[Batch]:
    """Batches of the ``keys`` columns of a dataset saved with ``save_to_disk``."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        name = split or ("train" if "train" in ds else (splits[0] if len(splits) == 1 else None))
        if name not in ds:
            raise PreprocessError(f"{path}: a DatasetDict with splits {splits}; choose one with --split")
        ds = ds[name]
    _check_columns(path, ds.column_names, keys)
    ds = ds.select_columns(list(keys))
    size, rows, done = input_size(path), len(ds), 0
    for cols in ds.iter(batch_size=chunk_size):
        n = len(cols[keys[0]])
        first, done = done, done + n
        progress = base + size * done // max(rows, 1)
        yield Batch(str(path), first, columns={k: list(cols[k]) for k in keys}, progress=progress)


def read_inputs(
    paths: Sequence[Path], keys: Sequence[str], chunk_size: int, split: str | None = None
) -> Iterator[Batch]:
    """All batches of all inputs, in order; ``progress`` counts bytes across inputs."""
    base = 0
    for path in paths:
        kind = input_kind(path)
        if kind == "jsonl":
            yield from read_jsonl(path, chunk_size, base)
        elif kind == "parquet":
            yield from read_parquet(path, keys, chunk_size, base)
        else:
            yield from read_hf_dataset(path, keys, chunk_size, base, split)
        base += input_size(path)
