"""The Weights & Biases logger in offline mode: the run W&B writes to disk holds TensorBoard's tags
with their values, on the iteration, samples and tokens axes.

The run file is read back here with its own format (a LevelDB-style record log of W&B's
``Record`` protobufs, behind a 7-byte ``:W&B`` header), not through our code."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import wandb  # noqa: F401 - the wandb extra is installed by scripts/setup.sh, so this test runs in CI
from wandb.proto import wandb_internal_pb2

from megatron.training.logging import MetricsLogger, WandbSettings, tensorboard_scalars, valid_scalars

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> list:
    """Every protobuf Record of an offline W&B run file."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    records, pending, offset = [], b"", 7
    while offset + 7 <= len(data):
        if BLOCK - offset % BLOCK < 7:  # a block's tail too short for a header is padding
            offset += BLOCK - offset % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        payload = data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            break
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_run_holds_the_tensorboard_tags(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train = {"lm loss": 5.25, "learning-rate": 3e-4, "batch-size": 8, "grad-norm": 1.5, "consumed-tokens": 2048,
             "tokens-per-second": 1000.0}
    valid = valid_scalars({"overall": 4.5, "fr": 4.0})
    logger = MetricsLogger(str(tmp_path / "run"), None, rank=0,
                           wandb=WandbSettings("bloom-test", "tiny", None, {"model": {"num_layers": 2}}))
    logger.log(10, train, kind="train", samples=80, tokens=2048)
    logger.log(10, valid, kind="valid", samples=80, tokens=2048)
    logger.close()

    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    rows = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    # The trainer logs training and validation at the same iteration: W&B keeps them in one row.
    assert len(rows) == 1 and "run" in kinds
    (row,) = rows
    expected = {tag: value for kind, scalars in [("train", train), ("valid", valid)]
                for tag, value, _ in tensorboard_scalars(kind, scalars, 10, 80, 2048)}
    assert row["_step"] == 10 and row["samples"] == 80 and row["tokens"] == 2048
    assert {k: v for k, v in row.items() if k not in ("_step", "_runtime", "_timestamp", "samples", "tokens")} \
        == expected
    assert row["lm-loss-training/lm loss vs tokens"] == 5.25 and row["lm-loss-validation/fr/lm loss validation"] == 4.0
    metrics = {r.metric.name: r.metric.step_metric for r in records if r.WhichOneof("record_type") == "metric"}
    assert metrics["lm-loss-training/lm loss vs samples"] == "samples"
    assert metrics["lm-loss-validation/valid/lm loss validation vs tokens"] == "tokens"
