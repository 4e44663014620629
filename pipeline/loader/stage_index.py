"""One index of a stage's labels and byte spans, written once, mapped by every rank.

The global-batch loader needs every sample's shard, byte span, key hash and packed label
(pipeline.loader.global_stream.SampleIndex). Read from the sidecars, that is every rank
opening every sidecar and hashing every key at the same moment: at CC12M on 64 ranks,
80,000 parquet reads and 770 M hashes before the first step. The reduce step, which reads
the sidecars once anyway, writes them here; a training rank maps the arrays (numpy memory
maps: the ranks of a node share the page cache) after one check of the stage record.

    stage<s>/sidecars/_index/shard.npy, offset.npy, length.npy, key_hash.npy, label.npy
    stage<s>/sidecars/_index/index.json   written last: the stage record it was made from,
                                          the shard names (row i of shard.npy is names[i]),
                                          the Ks and the skipped samples per problem kind
"""
from __future__ import annotations

import collections
import json
import logging
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq

from common.io import atomic_output, write_json
from pipeline.artifacts import shard_names, sidecar_skipped
from pipeline.loader.labels import stable_hash64
from pipeline.stage import StageDir, StageRecord, current_record

log = logging.getLogger("pipeline.loader")
COLUMNS = {"shard": np.int32, "offset": np.int64, "length": np.int64, "key_hash": np.int64, "label": np.int64}


def index_dir(stage: StageDir):
    return stage.sidecars_dir / "_index"


def write(stage: StageDir, record: StageRecord, names: Sequence[str]) -> dict | None:
    """Write the index of the sidecars of shards `names` (their file names: shard_names); returns its
    summary, or None when a shard has no byte spans (compressed shards: the slot loader's)."""
    folder = index_dir(stage)
    (folder / "index.json").unlink(missing_ok=True)  # the record goes first, is written last
    parts: dict[str, list] = {c: [] for c in COLUMNS}
    skipped: collections.Counter = collections.Counter()
    for i, name in enumerate(names):
        path = stage.sidecars_dir / f"{name}.parquet"
        table = pq.read_table(path, columns=["key", "label", "offset", "length"])
        n = table.num_rows
        if n and (table.column("length").to_numpy() <= 0).any():
            log.info("%s: no byte spans (a compressed shard); the stage has no index", path)
            return None
        parts["shard"].append(np.full(n, i, np.int32))
        parts["offset"].append(table.column("offset").to_numpy())
        parts["length"].append(table.column("length").to_numpy())
        parts["key_hash"].append(np.fromiter((stable_hash64(k) for k in table.column("key").to_pylist()),
                                             np.int64, n))
        parts["label"].append(table.column("label").to_numpy())
        skipped.update((sidecar_skipped(path) or {}).values())
    for column, dtype in COLUMNS.items():
        values = np.concatenate(parts[column]).astype(dtype) if parts[column] else np.zeros(0, dtype)
        with atomic_output(folder / f"{column}.npy", "wb") as f:
            np.save(f, values)
    summary = {"record": record.to_json(), "names": list(names), "ks": list(record.meta.ks),
               "skipped": dict(skipped), "samples": int(sum(len(p) for p in parts["label"]))}
    write_json(folder / "index.json", summary)
    return summary


def read(stage: StageDir, urls: Sequence[str]):
    """The SampleIndex of `urls` from the stage's index, memory-mapped; None when there is
    none, or it was made from another stage record (the caller reads the sidecars)."""
    from pipeline.loader.global_stream import SampleIndex

    folder = index_dir(stage)
    try:
        meta = json.loads((folder / "index.json").read_text())
        if meta["record"] != current_record(stage).to_json():
            log.warning("%s: made from an earlier stage record; reading the sidecars", folder)
            return None
    except Exception:  # noqa: BLE001 - none, unreadable, or no current record: reading the sidecars says why
        return None
    names = shard_names(urls)
    position = {name: i for i, name in enumerate(names)}
    held = set(meta["names"])
    missing = [u for u, name in zip(urls, names) if name not in held]
    if missing:
        log.warning("%s: holds no entry for shard %s; reading the sidecars", folder, missing[0])
        return None
    arrays = {c: np.load(folder / f"{c}.npy", mmap_mode="r") for c in COLUMNS}
    to_url = np.array([position.get(name, -1) for name in meta["names"]], np.int32)
    shard = to_url[arrays["shard"]] if len(arrays["shard"]) else np.zeros(0, np.int32)
    keep = shard >= 0
    if keep.all():
        cols = {c: arrays[c] for c in COLUMNS if c != "shard"}
    else:  # the data spec names fewer shards than the stage was made from
        cols = {c: np.asarray(arrays[c])[keep] for c in COLUMNS if c != "shard"}
        shard = shard[keep]
    return SampleIndex(list(urls), shard, cols["offset"], cols["length"], cols["key_hash"], cols["label"],
                       tuple(meta["ks"]), {k: int(v) for k, v in meta["skipped"].items()})


def group_sizes(stage: StageDir) -> dict[int, int] | None:
    """{packed label: samples} from the reduce step's record when it is of the current stage
    record (None otherwise: the caller counts the sidecars)."""
    try:
        stats = json.loads(stage.assign_stats.read_text())
        if stats.get("record") != current_record(stage).to_json():
            return None
        return {int(k): int(v) for k, v in json.loads(stage.groups.read_text())["sizes"].items()}
    except Exception:  # noqa: BLE001 - not reduced (yet), or stale
        return None
