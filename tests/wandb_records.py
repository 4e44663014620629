"""Reading an offline W&B run's transaction log (`run-<id>.wandb`) in the tests.

The file is W&B's record log: a 7-byte header (":W&B", magic, version), then the LevelDB log
format (32 KiB blocks of chunks: crc32 (4), length (2), type (1: full, 2: first, 3: middle,
4: last)), each assembled chunk a `wandb_internal_pb2.Record`. wandb 0.30 keeps no Python
reader of it (its core is in Go), so the tests read it here, with W&B's own protobuf schema."""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7


def records(path: Path):
    from common.imports import allow_import

    allow_import("wandb")  # pipeline/__init__ keeps it out of processes that do not log to W&B
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    pos, chunk = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if left < HEADER or (length == 0 and kind == 0):  # the block's zero padding
            pos += left
            continue
        chunk += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def history(path: Path) -> list[dict]:
    """Every `run.log` row of the run: {key: value} (W&B's own keys start with "_")."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def config(path: Path) -> dict:
    """The run's config as logged ({key: value})."""
    out = {}
    for record in records(path):
        if record.WhichOneof("record_type") in ("config", "run"):
            items = record.config.update if record.HasField("config") else record.run.config.update
            out.update({item.key: json.loads(item.value_json) for item in items})
    return out


def run(path: Path):
    """The run's RunRecord (group, display name, id, project)."""
    return next(r.run for r in records(path) if r.WhichOneof("record_type") == "run")
