"""Writing shards in img2dataset's webdataset layout.

For shard `NNNNN` the folder gets `NNNNN.tar` (members `{key}.jpg|png|webp`,
`{key}.txt`, `{key}.json`), `NNNNN.parquet` (one row of metadata per sample) and
`NNNNN_stats.json`; the folder's `sizes.json` maps shard basenames to sample counts,
which is what open_clip reads. Tars are byte-reproducible (fixed mtime, owner, order)
and every file is written to a temporary name and renamed when complete, the tar last,
so an existing tar means a complete shard.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from common.io import atomic_output, atomic_path, write_json

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PARQUET_COLUMNS = ("key", "caption", "status", "error_message", "width", "height",
                   "original_width", "original_height", "sha256", "url")
INT_COLUMNS = {"width", "height", "original_width", "original_height"}


def sample_meta(key: str, caption: str, image: bytes, width: int, height: int,
                url: str | None = None, **extra) -> dict:
    """The per-sample metadata img2dataset stores in `{key}.json` and the parquet."""
    return {
        "key": key, "caption": caption, "status": "success", "error_message": None,
        "width": width, "height": height, "original_width": width, "original_height": height,
        "sha256": hashlib.sha256(image).hexdigest(), "url": url, **extra,
    }


def write_shard(out_dir: str | os.PathLike, name: str, samples: Iterable[Mapping],
                metadata: bool = True) -> int:
    """Write one shard from samples {"__key__", ext: bytes | str | dict}; returns the count.

    A dict value (the "json" member) is JSON-encoded, a str UTF-8 encoded, bytes kept as
    they are. With `metadata`, the parquet and _stats.json are written too, before the
    tar is published: each file is atomic and the tar comes last, so a present tar
    implies a complete shard.
    """
    out_dir = Path(out_dir)
    rows, count = [], 0
    with atomic_output(out_dir / f"{name}.tar", "wb") as f:
        # an int mtime: a float one makes tarfile add a PAX header to every member (twice the
        # bytes, twice the parse time when reading)
        with wds.TarWriter(f, encoder=False, mtime=0, user="mcl", group="mcl") as tw:
            for s in samples:
                tw.write({k: _member_bytes(v) if k != "__key__" else v for k, v in s.items()})
                rows.append(_parquet_row(s))
                count += 1
        if metadata:
            _write_parquet(out_dir / f"{name}.parquet", rows)
            write_json(out_dir / f"{name}_stats.json", {
                "count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0,
                "status_dict": {"success": count},
            })
    return count


def _member_bytes(v) -> bytes:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, str):
        return v.encode("utf-8")
    return json.dumps(v, sort_keys=True).encode("utf-8")


def _parquet_row(s: Mapping) -> dict:
    meta = s.get("json")
    if isinstance(meta, (bytes, bytearray)):
        try:
            meta = json.loads(meta)
        except ValueError:
            meta = None
    text = s.get("txt")
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", errors="replace")
    row = {"key": s["__key__"], "caption": text, "status": "success",
           **(meta if isinstance(meta, dict) else {})}
    out = {}
    for c in PARQUET_COLUMNS:
        v = row.get(c)
        if v is not None:
            try:
                v = int(v) if c in INT_COLUMNS else str(v)
            except (TypeError, ValueError):
                v = None
        out[c] = v
    return out


def _write_parquet(path: Path, rows: list[dict]) -> None:
    schema = pa.schema([
        ("key", pa.string()), ("caption", pa.string()), ("status", pa.string()),
        ("error_message", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
        ("original_width", pa.int64()), ("original_height", pa.int64()),
        ("sha256", pa.string()), ("url", pa.string()),
    ])
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_sizes(out_dir: str | os.PathLike, sizes: Mapping[str, int]) -> Path:
    """Write open_clip's sizes.json: {shard basename: sample count}."""
    path = Path(out_dir) / "sizes.json"
    write_json(path, {os.path.basename(k): int(v) for k, v in sorted(sizes.items())}, if_changed=True)
    return path
