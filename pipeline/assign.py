"""Assign every sample to its nearest centroid and write the per-shard sidecars.

    python -m pipeline.assign --stage runs/r/stage2 --stage-index 2 --parent runs/r/stage1 \\
        [--task I --tasks N]
    python -m pipeline.assign --stage runs/r/stage2 --reduce [--data SPEC]

Task I of N takes every N-th embedding file of the stage and writes
`STAGE/sidecars/<shard>.parquet` (format: pipeline.artifacts): each sample's cluster id
c_s and its pseudo-label, the packed combination of all its cluster ids so far, read from
the parent stage's sidecar of the same shard by key. The stage, K, and fingerprints of the
model, the centroids and the parent's centroids sit in the file, and once in the stage
record `STAGE/sidecars/_stage.json` (pipeline.stage), so a stale or foreign sidecar is
refused by readers; a rerun skips sidecars that are current.

`--reduce` (after all tasks) records the size of every pseudo-label group in
`STAGE/sidecars/_groups.json` (how many groups cannot fill a batch), the clusters'
sizes and NMI per attribute over all samples in `STAGE/clusters/assign_stats.json`, and
with `--data` a PNG grid of sample images per cluster with its most frequent caption words.
"""
from __future__ import annotations

import collections
import json
import logging
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from common.cli import ArgumentParser, UsageError, add_task_args, run_main, setup_logging
from common.io import atomic_output, write_json
from pipeline.artifacts import (StaleSidecarError, check_sidecar, read_embeddings, read_sidecar,
                                read_sidecar_columns, read_skipped, shard_stem, sidecar_meta, write_sidecar)
from pipeline.metrics import attribute_nmi, attribute_purity
from shards.reader import expand_urls
from pipeline.stage import (StageDir, check_sidecars, current_record, expected_record, read_record,
                            write_record)

log = logging.getLogger("pipeline.assign")


def load_centroids(stage: StageDir) -> np.ndarray:
    if not stage.centroids.exists():
        raise UsageError(f"{stage.centroids}: no centroids; run pipeline.cluster first")
    return np.load(stage.centroids)


def is_done(stage_dir: str | Path, stage_index: int, parent: str | Path | None, urls) -> bool:
    """The stage record is current and every shard's sidecar carries it."""
    stage = StageDir(stage_dir)
    try:
        expect = expected_record(stage, stage_index, StageDir(parent) if parent else None)
        if read_record(stage) != expect:
            return False
        check_sidecars(stage, urls, expect.meta)
        return True
    except (UsageError, StaleSidecarError, OSError, ValueError):
        return False


def assign(stage_dir: str | Path, stage_index: int, parent: str | Path | None = None, task: int = 0,
           tasks: int = 1) -> list[Path]:
    """Write this task's sidecars (and the stage record); returns their paths."""
    stage = StageDir(stage_dir)
    parent_stage = StageDir(parent) if parent else None
    if not 0 <= task < tasks:
        raise UsageError(f"--task must be in [0, {tasks}), got {task}")
    record = expected_record(stage, stage_index, parent_stage)
    meta = record.meta
    parent_meta = read_record(parent_stage).meta if parent_stage else None
    centroids = load_centroids(stage).astype(np.float32)
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    write_record(stage, record)
    files = stage.embedding_files()[task::tasks]
    out, written = [], 0
    for f in files:
        path = stage.sidecar(f.stem)
        out.append(path)
        for leftover in path.parent.glob(f".{path.name}.*.tmp"):  # a write cut short by a kill
            leftover.unlink(missing_ok=True)  # only this task writes this shard's sidecar
        if path.exists():
            try:
                check_sidecar(path, meta)
                continue  # current
            except Exception:  # noqa: BLE001 - stale, or a file cut short by a kill: rewrite it
                pass
        z = read_embeddings(f, ("embeddings", "keys", "model_fp", "spans"))
        if str(z["model_fp"]) != meta.model_fp:
            raise StaleSidecarError(f"{f}: embedded by another model than the one {stage.cluster_stats} "
                                    "clustered; rerun pipeline.cluster")
        keys = z["keys"].tolist()
        if len(keys):
            _, nearest = index.search(np.ascontiguousarray(z["embeddings"], dtype=np.float32), 1)
            clusters = nearest[:, 0].astype(np.int64)
        else:
            clusters = np.zeros(0, np.int64)
        labels = clusters.copy()
        if parent_stage is not None:
            parent_path = parent_stage.sidecar(f.stem)
            if not parent_path.exists():
                raise UsageError(f"{parent_path}: missing parent sidecar for shard {f.stem}")
            parent_labels = read_sidecar(parent_path, parent_meta)
            missing = [k for k in keys if k not in parent_labels]
            if missing:
                raise UsageError(f"{parent_path}: no entry for key {missing[0]} ({len(missing)} keys missing)")
            labels = np.array([parent_labels[k] for k in keys], dtype=np.int64) * meta.k + clusters
        write_sidecar(path, keys, clusters, labels, meta, skipped=read_skipped(f), spans=z["spans"])
        written += 1
    log.info("task %d of %d: %d sidecars written, %d current", task, tasks, written, len(files) - written)
    return out


def reduce_is_done(stage_dir: str | Path) -> bool:
    """The summary was made from the stage's current sidecars."""
    stage = StageDir(stage_dir)
    try:
        stats = json.loads(stage.assign_stats.read_text())
        return stats.get("record") == current_record(stage).to_json()
    except (UsageError, StaleSidecarError, OSError, ValueError):
        return False


def reduce(stage_dir: str | Path, data: str | None = None, batch_sizes: Sequence[int] = (64, 256, 1024),
           grid_per_cluster: int = 8) -> dict:
    """Group sizes, cluster sizes and NMI over all samples, and the cluster grid PNG."""
    stage = StageDir(stage_dir)
    record = current_record(stage)
    meta, stage_index = record.meta, record.stage
    groups: collections.Counter = collections.Counter()
    cluster_sizes = np.zeros(meta.k, np.int64)
    assignments, attributes = [], []
    words: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    key_cluster: dict[str, int] = {}
    grid_shards: set[str] = set()  # the grid reads only these shards' samples
    for f in stage.embedding_files():
        path = stage.sidecar(f.stem)
        if not path.exists():
            raise UsageError(f"{path}: missing; run every assign task before --reduce")
        got = sidecar_meta(path)
        if got["centroids_fp"] != meta.centroids_fp or got["model_fp"] != meta.model_fp:
            raise StaleSidecarError(f"{path}: stale sidecar (other model or centroids); rerun assign")
        keys, clusters, labels = read_sidecar_columns(path)
        groups.update(labels.tolist())
        cluster_sizes += np.bincount(clusters, minlength=meta.k)
        z = read_embeddings(f, ("keys", "captions", "attributes"))
        if z["keys"].tolist() != keys:
            raise StaleSidecarError(f"{path}: keys differ from {f}; rerun assign")
        assignments.append(clusters)
        attributes += z["attributes"].tolist()
        for c, caption in zip(clusters.tolist(), z["captions"].tolist()):
            words[c].update(w for w in caption.lower().split() if w not in _STOPWORDS)
        if len(key_cluster) < 50 * meta.k * grid_per_cluster:
            key_cluster.update(zip(keys, clusters.tolist()))
            grid_shards.add(f.stem)
    sizes = sorted(groups.values())
    summary = {
        "stage": stage_index, "ks": list(meta.ks), "samples": int(sum(sizes)), "groups": len(sizes),
        "smallest_group": sizes[0] if sizes else 0, "largest_group": sizes[-1] if sizes else 0,
        "groups_smaller_than": {str(b): sum(1 for s in sizes if s < b) for b in batch_sizes},
        "samples_in_groups_smaller_than": {str(b): int(sum(s for s in sizes if s < b)) for b in batch_sizes},
    }
    write_json(stage.groups, {**summary, "sizes": {str(k): v for k, v in groups.items()}})
    top_words = {str(c): [w for w, _ in words[c].most_common(5)] for c in range(meta.k)}
    stats = {"stage": stage_index, "k": meta.k, "cluster_sizes": cluster_sizes.tolist(),
             "nmi": attribute_nmi(np.concatenate(assignments), attributes) if assignments else {},
             "purity": attribute_purity(np.concatenate(assignments), attributes) if assignments else {},
             "top_words": top_words, "groups": summary, "record": record.to_json()}
    if data:
        urls = [u for u in expand_urls(data) if shard_stem(u) in grid_shards]
        cluster_grid(urls, key_cluster, top_words, cluster_sizes, stage.grid, grid_per_cluster)
    write_json(stage.assign_stats, stats)  # last: reduce_is_done reads it
    log.info("stage %d: %d samples in %d groups (smallest %d, largest %d); groups below batch sizes %s; NMI %s",
             stage_index, summary["samples"], summary["groups"], summary["smallest_group"],
             summary["largest_group"], summary["groups_smaller_than"], stats["nmi"])
    return stats


_STOPWORDS = {"a", "an", "the", "of", "on", "in", "photo", "some", "at", "and", "with", "background", "pointing"}


def cluster_grid(data: str | Sequence[str], key_cluster: dict[str, int], top_words: dict, sizes: np.ndarray, path: Path,
                 per_cluster: int) -> Path:
    """One row per cluster: its size, its top caption words and `per_cluster` sample images."""
    from PIL import Image, ImageDraw

    from shards.reader import ProblemLog, read_samples

    k = len(sizes)
    chosen: dict[int, list] = collections.defaultdict(list)
    for s in read_samples(data, ProblemLog(logger=None)):
        c = key_cluster.get(s["__key__"])
        if c is not None and len(chosen[c]) < per_cluster:
            chosen[c].append(s["image"])
        if sum(len(v) for v in chosen.values()) >= k * per_cluster or len(key_cluster) == 0:
            break
    cell, label_w = 64, 260
    img = Image.new("RGB", (label_w + per_cluster * (cell + 2), k * (cell + 2)), "white")
    draw = ImageDraw.Draw(img)
    for c in range(k):
        y = c * (cell + 2)
        draw.text((4, y + 4), f"cluster {c}  n={int(sizes[c])}", fill="black")
        draw.text((4, y + 22), ", ".join(top_words.get(str(c), [])[:5])[:40], fill="black")
        for j, im in enumerate(chosen.get(c, [])):
            img.paste(im.resize((cell, cell)), (label_w + j * (cell + 2), y))
    with atomic_output(path, "wb") as f:
        img.save(f, format="PNG")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m pipeline.assign", description=__doc__)
    p.add_argument("--stage", required=True, help="stage folder holding embeddings/ and clusters/")
    p.add_argument("--stage-index", type=int, help="this stage's number s (not with --reduce: the record has it)")
    p.add_argument("--parent", help="the previous stage's folder (its sidecars give c_1..c_{s-1})")
    p.add_argument("--reduce", action="store_true", help="summarise all sidecars (after every task)")
    p.add_argument("--data", help="with --reduce: shard spec, to draw the cluster grid PNG")
    add_task_args(p)
    args = p.parse_args(argv)
    setup_logging()
    if args.reduce:
        reduce(args.stage, args.data)
    else:
        if args.stage_index is None:
            raise UsageError("--stage-index is required (except with --reduce)")
        assign(args.stage, args.stage_index, args.parent, args.task, args.tasks)
    return 0


if __name__ == "__main__":
    run_main(main, "python -m pipeline.assign")
