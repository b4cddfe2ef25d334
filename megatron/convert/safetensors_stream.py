"""Write sharded safetensors files tensor by tensor, without holding a shard in memory.

The safetensors format is an 8-byte little-endian header length, a JSON header mapping each
tensor name to its dtype, shape and byte range, and the raw little-endian bytes. Because the
header comes first, a writer normally needs every tensor of a file at hand. Here the shapes
and dtypes are planned in advance (``TensorPlan``), so each file's header is written up front
and the tensors are then appended in plan order as they are produced: peak memory is one
tensor, whatever the model size.

    plan = [TensorPlan("transformer.word_embeddings.weight", (V, h), torch.bfloat16), ...]
    with ShardedSafetensorsWriter(out_dir, plan, max_shard_size=parse_size("5GB")) as writer:
        for name, tensor in produce():
            writer.write(name, tensor)

Files are named as transformers names them: ``model.safetensors`` when everything fits in one
shard, else ``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional, Sequence

import torch

from megatron.errors import ConversionError

DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str | int) -> int:
    """Bytes in a size like ``"5GB"`` (10^9, as transformers counts), ``"500MiB"`` or ``1000``."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read size {text!r}: use a number with an optional unit, e.g. 5GB, 500MB, 2GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


@dataclass(frozen=True)
class TensorPlan:
    """A tensor to be written: its name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(tensors: Sequence[TensorPlan], max_shard_size: int) -> list[list[TensorPlan]]:
    """Cut ``tensors`` (in order) into shards of at most ``max_shard_size`` bytes each; a tensor
    larger than the limit gets a shard of its own (as transformers does)."""
    shards: list[list[TensorPlan]] = []
    current: list[TensorPlan] = []
    size = 0
    for plan in tensors:
        if current and size + plan.nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(plan)
        size += plan.nbytes
    if current:
        shards.append(current)
    return shards


def _header_bytes(shard: Sequence[TensorPlan], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for plan in shard:
        header[plan.name] = {"dtype": DTYPE_CODES[plan.dtype], "shape": list(plan.shape),
                             "data_offsets": [offset, offset + plan.nbytes]}
        offset += plan.nbytes
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(body)) + body


class ShardedSafetensorsWriter:
    """Streams planned tensors into one or more safetensors files (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, tensors: Sequence[TensorPlan], max_shard_size: int,
                 metadata: Optional[dict[str, str]] = None):
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise ValueError("tensor names must be unique")
        for plan in tensors:
            if plan.dtype not in DTYPE_CODES:
                raise ConversionError(f"{plan.name}: dtype {plan.dtype} cannot be stored in safetensors")
        self.directory = Path(directory)
        self.shards = plan_shards(tensors, max_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        count = len(self.shards)
        self.file_names = ([SINGLE_FILE] if count == 1 else
                           [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self._queue = [(shard_index, plan) for shard_index, shard in enumerate(self.shards) for plan in shard]
        self._position = 0
        self._file: Optional[BinaryIO] = None
        self._open_shard = -1
        self._written: Optional[list[str]] = None

    def __enter__(self) -> "ShardedSafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._file is not None:
            self._file.close()

    @property
    def total_size(self) -> int:
        """Bytes of tensor data over all shards (the index's ``metadata.total_size``)."""
        return sum(plan.nbytes for shard in self.shards for plan in shard)

    def expected_name(self) -> Optional[str]:
        """Name of the next tensor to write, or None when all are written."""
        return self._queue[self._position][1].name if self._position < len(self._queue) else None

    def write(self, name: str, tensor: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Append the next planned tensor; its name, shape and dtype must match the plan.

        ``tensor`` may also be a list of parts whose concatenation along dim 0 is the tensor
        (e.g. the TP shards of a vocabulary-split embedding): they are written one after the
        other, and the whole tensor is never built in memory.
        """
        if self._position >= len(self._queue):
            raise ConversionError(f"{name}: every planned tensor was already written")
        shard_index, plan = self._queue[self._position]
        if name != plan.name:
            raise ConversionError(f"tensors must come in plan order: expected {plan.name}, got {name}")
        parts = [tensor] if isinstance(tensor, torch.Tensor) else list(tensor)
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:]) if parts[0].dim() else ()
        if (tuple(shape) != plan.shape or any(p.dtype != plan.dtype for p in parts)
                or any(p.shape[1:] != parts[0].shape[1:] for p in parts)):
            raise ConversionError(f"{name}: got shape {tuple(shape)} {parts[0].dtype} (from {len(parts)} part(s)), "
                                  f"planned {plan.shape} {plan.dtype}")
        if shard_index != self._open_shard:
            if self._file is not None:
                self._file.close()
            self._file = open(self.directory / self.file_names[shard_index], "wb")
            self._file.write(_header_bytes(self.shards[shard_index], self.metadata))
            self._open_shard = shard_index
        for part in parts:
            data = part.detach().to("cpu").contiguous()
            if data.numel():
                self._file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self._position += 1

    def close(self) -> list[str]:
        """Finish: check every planned tensor was written, write the index when sharded; returns
        the file names. Closing again returns the same names."""
        if self._written is not None:
            return list(self._written)
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._position != len(self._queue):
            raise ConversionError(f"only {self._position} of {len(self._queue)} planned tensors were written; "
                                  f"next expected: {self.expected_name()}")
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {plan.name: self.file_names[i] for i, shard in enumerate(self.shards)
                                    for plan in shard}}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n",
                                                     encoding="utf-8")
            self._written = self.file_names + [INDEX_FILE]
        else:
            self._written = list(self.file_names)
        return list(self._written)


_DTYPES_BY_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}


class SafetensorsReader:
    """Reads tensors of one safetensors file one at a time with plain file reads (no memory map),
    so a process holds only the tensors it asked for and still uses."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > 100 * 2**20:
                    raise ValueError(f"header length {length} is implausible")
                header = json.loads(f.read(length))
        except (OSError, ValueError, struct.error) as err:
            raise ConversionError(f"{self.path} is not a readable safetensors file ({err})") from None
        self.data_start = 8 + length
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header

    def keys(self) -> list[str]:
        """Tensor names in the file."""
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of ``name`` (from the header)."""
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        """dtype of ``name`` (from the header)."""
        code = self.entries[name]["dtype"]
        if code not in _DTYPES_BY_CODE:
            raise ConversionError(f"{self.path}: tensor {name} has dtype {code}, which this reader does not handle")
        return _DTYPES_BY_CODE[code]

    def get_tensor(self, name: str) -> torch.Tensor:
        """Read ``name`` into a new tensor."""
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        tensor = torch.empty(self.shape(name), dtype=self.dtype(name))
        if end - begin != tensor.numel() * tensor.element_size():
            raise ConversionError(f"{self.path}: tensor {name} spans {end - begin} bytes, but its shape and dtype "
                                  f"need {tensor.numel() * tensor.element_size()}")
        if tensor.numel():
            buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            with open(self.path, "rb") as f:
                f.seek(self.data_start + begin)
                if f.readinto(buffer) != end - begin:
                    raise ConversionError(f"{self.path} is truncated: tensor {name} is incomplete")
        return tensor
