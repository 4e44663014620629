"""On-disk formats between the clustering jobs: per-shard embeddings and cluster-id sidecars.

Where each file lives in a stage folder (s = the stage whose model produced them) is
pipeline.stage's `StageDir`; the formats:

    stage<s>/embeddings/<shard>.npz     one per input shard (written by pipeline.embed)
        embeddings  float16 [n, d], L2-normalised
        keys        str [n]          the samples' __key__ (never positions)
        caption_bytes uint8, caption_ends int64 [n]   the captions, UTF-8, one after the other
                                     (read_embeddings(..., ("captions",)) decodes them)
        attributes  str [n]          the json "attributes" of each sample ("" when absent)
        spans       int64 [n, 2]     the (start, end) bytes of each sample's members in its tar
                                     (shards.reader.read_span reads a sample back from them)
        model_fp    str []           fingerprint of the model (and tower) that embedded them
        skipped_keys, skipped_kinds  str [m]  the samples of the shard the reader skipped (a key
                                     and its problem kind, e.g. corrupt_image): they have no row;
                                     a problem of the shard itself under `__shard__:<kind>`
    stage<s>/clusters/centroids.npy     float32 [K, d]      (pipeline.cluster)
    stage<s>/clusters/stats.json        K, objective, time, sample size, sizes, NMI per attribute
    stage<s>/sidecars/<shard>.parquet   one per input shard (pipeline.assign)
        key      string   the sample's __key__
        cluster  int32    its cluster id at this stage, c_s
        label    int64    its pseudo-label for stage s+1: the packed (c_1, ..., c_s),
                          label_s = label_{s-1} * K_s + c_s (label_0 = 0)
        offset, length  int64  where the sample's members lie in its tar: the random-access
                          index of the global-batch loader (pipeline.loader.global_stream)
      and, in the parquet schema metadata, `mcl.sidecar` = JSON
        {"stage", "k", "ks" (K of every stage 1..s), "model_fp", "centroids_fp", "parent_fp", "shard"}
      and `mcl.skipped` = JSON {key: problem kind}: the samples the embed job could not use
        (a corrupt image, ...: the reader's problem kinds). They have no row; a reader of the
        shard that meets one skips it and counts it under that kind. A key with neither a row
        nor a skip record means a stale or foreign sidecar.
    stage<s>/sidecars/_stage.json       the stage record: this metadata once (pipeline.stage)
    stage<s>/sidecars/_groups.json      size of every pseudo-label group (the reduce step)

Parquet is the per-shard table format of the ecosystem (img2dataset writes one per shard)
and keeps the stage metadata inside the file, so a sidecar cannot be separated from what
made it. `read_sidecar` refuses a sidecar of another stage, model or set of centroids.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.cli import UsageError
from common.io import atomic_output, atomic_path
from shards.reader import is_local, local_path, shard_basename

SIDECAR_META_KEY = b"mcl.sidecar"
SKIPPED_META_KEY = b"mcl.skipped"


class StaleSidecarError(ValueError):
    """A sidecar made by another stage, model or centroids than the one expected."""


def shard_stem(url: str) -> str:
    return shard_basename(url).split(".", 1)[0]


_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")


def _name_parts(url: str) -> list[str]:
    """The path components of a shard URL, last first, the last one without its extensions:
    a local shard's absolute path (so `a/0.tar` and `./a/0.tar` are the same file), a
    remote one's host and path; characters unsafe in a file name become `_`."""
    if is_local(url):
        parts = os.path.abspath(local_path(url)).replace("\\", "/").split("/")
    else:
        rest = url.split(":", 1)[1] if ":" in url else url
        parts = re.split(r"[/\\\s]+", rest)
    parts = [p for p in parts if p]
    if not parts:
        return [_UNSAFE.sub("_", url)]
    parts[-1] = parts[-1].split(".", 1)[0] or parts[-1]
    return [_UNSAFE.sub("_", p) for p in reversed(parts)]


def shard_names(urls: Sequence[str]) -> list[str]:
    """The file name (without extension) of each shard's embeddings and sidecar: the bare
    stem (`00000` for `.../00000.tar`) when the stems are unique, as in one img2dataset
    folder; else the shortest path suffix, the same depth for every shard, that tells them
    apart, joined with `__` (`a__00000`, `b__00000` for two img2dataset folders `a/` and
    `b/` joined with `::`). A shard listed twice is refused (UsageError naming it): its
    samples would count twice."""
    urls = list(urls)
    parts = [_name_parts(u) for u in urls]
    seen: dict[str, str] = {}
    for url in urls:
        ident = os.path.abspath(local_path(url)) if is_local(url) else url
        if ident in seen:
            raise UsageError(f"shard {url} is listed twice in the data spec"
                             + (f" (also as {seen[ident]})" if seen[ident] != url else "")
                             + "; each shard may appear once")
        seen[ident] = url
    depth = max((len(p) for p in parts), default=1)
    for n in range(1, depth + 1):
        names = ["__".join(reversed(p[:n])) for p in parts]
        if len(set(names)) == len(names):
            return names
    names = ["__".join(reversed(p)) for p in parts]  # suffixes of different lengths that coincide
    dup = next(u for u, name in zip(urls, names) if names.count(name) > 1)
    raise UsageError(f"shard {dup}: cannot be given a file name apart from another shard of the data spec; "
                     "rename one of them")


def file_fingerprint(path: str | os.PathLike, extra: str = "") -> str:
    """A hash of the file's bytes and `extra`; a file seen unchanged (same inode, size and
    modification time) is not read again in this process: launch's plan and a training's
    done test fingerprint the same stage weights several times."""
    st = os.stat(path)
    return _file_fingerprint(os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns, extra)


@functools.lru_cache(maxsize=256)
def _file_fingerprint(path: str, inode: int, size: int, mtime_ns: int, extra: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(extra.encode())
    return h.hexdigest()[:16]


def array_fingerprint(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


# --- embeddings -----------------------------------------------------------------------


def write_embeddings(path: Path, embeddings: np.ndarray, keys: list[str], captions: list[str],
                     attributes: list[str], model_fp: str, skipped: dict[str, str] | None = None,
                     spans: list[tuple[int, int]] | None = None) -> None:
    skipped = skipped or {}
    spans = np.asarray(spans if spans is not None else np.zeros((len(keys), 2)), dtype=np.int64).reshape(-1, 2)
    encoded = [c.encode("utf-8") for c in captions]  # UTF-8 with offsets, not fixed-width UTF-32:
    ends = np.cumsum([len(c) for c in encoded], dtype=np.int64)  # one 2,000-character caption
    with atomic_output(path, "wb") as f:                             # would widen every row
        np.savez(f, embeddings=embeddings.astype(np.float16), keys=np.array(keys, dtype=str),
                 caption_bytes=np.frombuffer(b"".join(encoded), dtype=np.uint8), caption_ends=ends,
                 attributes=np.array(attributes, dtype=str),
                 model_fp=np.array(model_fp), skipped_keys=np.array(list(skipped), dtype=str),
                 skipped_kinds=np.array(list(skipped.values()), dtype=str), spans=spans)


def read_skipped(path: Path) -> dict[str, str]:
    """{key: problem kind} of the samples of the shard that the embed job could not use."""
    with np.load(path, allow_pickle=False) as z:
        if "skipped_keys" not in z.files:
            return {}
        return dict(zip(z["skipped_keys"].tolist(), z["skipped_kinds"].tolist()))


def read_embeddings(path: Path, fields=("embeddings", "keys")) -> dict:
    with np.load(path, allow_pickle=False) as z:
        out = {k: z[k] for k in fields if k != "captions" or "captions" in z.files}
        if "captions" in fields and "captions" not in out:
            data, ends = z["caption_bytes"].tobytes(), z["caption_ends"]
            starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
            out["captions"] = np.array([data[a:b].decode("utf-8") for a, b in zip(starts, ends)], dtype=object)
        return out


def embeddings_model_fp(path: Path) -> str | None:
    """The fingerprint of the model that embedded a shard; None for a file without one or
    of an older format (no spans): the embed job redoes those."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return str(z["model_fp"]) if "spans" in z.files else None
    except (OSError, ValueError, KeyError):
        return None


# --- sidecars -------------------------------------------------------------------------


@dataclass(frozen=True)
class SidecarMeta:
    stage: int
    k: int
    ks: tuple
    model_fp: str
    centroids_fp: str
    parent_fp: str  # centroids_fp of the previous stage ("" at stage 1)

    def to_json(self, shard: str) -> bytes:
        return json.dumps({"stage": self.stage, "k": self.k, "ks": list(self.ks), "model_fp": self.model_fp,
                           "centroids_fp": self.centroids_fp, "parent_fp": self.parent_fp,
                           "shard": shard}, sort_keys=True).encode()


def write_sidecar(path: Path, keys, clusters: np.ndarray, labels: np.ndarray, meta: SidecarMeta,
                  skipped: dict[str, str] | None = None, spans: np.ndarray | None = None) -> None:
    spans = np.asarray(spans if spans is not None else np.zeros((len(keys), 2)), dtype=np.int64).reshape(-1, 2)
    table = pa.table({"key": pa.array(list(keys), pa.string()),
                      "cluster": pa.array(clusters.astype(np.int32)),
                      "label": pa.array(labels.astype(np.int64)),
                      "offset": pa.array(spans[:, 0]), "length": pa.array(spans[:, 1] - spans[:, 0])})
    table = table.replace_schema_metadata({SIDECAR_META_KEY: meta.to_json(path.stem),
                                           SKIPPED_META_KEY: json.dumps(skipped or {}, sort_keys=True).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def sidecar_meta(path: Path) -> dict:
    md = pq.read_schema(path).metadata or {}
    if SIDECAR_META_KEY not in md:
        raise StaleSidecarError(f"{path}: not an MCL sidecar (no {SIDECAR_META_KEY.decode()} metadata)")
    return json.loads(md[SIDECAR_META_KEY])


def check_sidecar(path: Path, expect: SidecarMeta) -> None:
    """Refuses (StaleSidecarError) a sidecar whose recorded metadata does not match `expect`,
    or of an older format; reads only the parquet footer."""
    meta = sidecar_meta(path)
    if "offset" not in pq.read_schema(path).names:
        raise StaleSidecarError(f"{path}: a sidecar of an older format (no byte offsets); rerun the embed "
                                "and assign steps of this stage")
    want = json.loads(expect.to_json(path.stem))
    for field in ("stage", "k", "ks", "model_fp", "centroids_fp", "parent_fp", "shard"):
        if meta.get(field) != want[field]:
            raise StaleSidecarError(
                f"{path}: stale or foreign sidecar: {field} is {meta.get(field)!r}, expected {want[field]!r} "
                "(rerun the assign step of this stage)")


def sidecar_skipped(path: Path) -> dict[str, str] | None:
    """{key: problem kind} of the shard's samples that have no entry because the embed job
    could not use them (read from the footer); None for a sidecar written before skip records."""
    md = pq.read_schema(path).metadata or {}
    return json.loads(md[SKIPPED_META_KEY]) if SKIPPED_META_KEY in md else None


def read_sidecar(path: Path, expect: SidecarMeta | None = None) -> dict[str, int]:
    """{key: label} of one shard's sidecar; refuses one that does not match `expect`."""
    if expect is not None:
        check_sidecar(path, expect)
    else:
        sidecar_meta(path)
    table = pq.read_table(path, columns=["key", "label"])
    return dict(zip(table.column("key").to_pylist(), table.column("label").to_pylist()))


def read_sidecar_columns(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    table = pq.read_table(path)
    return (table.column("key").to_pylist(), table.column("cluster").to_numpy(),
            table.column("label").to_numpy())
