"""Assign every sample to its nearest centroid and write the per-shard sidecars.

    python -m pipeline.assign --stage runs/r/stage2 --stage-index 2 --parent runs/r/stage1 \\
        [--task I --tasks N]
    python -m pipeline.assign --stage runs/r/stage2 --stage-index 2 --parent runs/r/stage1 --reduce \\
        [--data SPEC] [--batch-size 256]

Task I of N takes every N-th embedding file of the stage and writes
`STAGE/sidecars/<shard>.parquet` (format: pipeline.artifacts): each sample's cluster id
c_s and its pseudo-label, the packed combination of all its cluster ids so far, read from
the parent stage's sidecar of the same shard by key. The stage, K, and fingerprints of the
model, the centroids and the parent's centroids sit in the file, so a stale or foreign
sidecar is refused by readers; a rerun skips sidecars that are current.

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

from pipeline.artifacts import (SidecarMeta, StaleSidecarError, array_fingerprint, check_sidecar,
                                embeddings_model_fp, read_embeddings, read_sidecar, read_sidecar_columns,
                                sidecar_meta, write_sidecar)
from pipeline.cluster import attribute_nmi, attribute_purity, embedding_files
from pipeline.embed import add_task_args
from common.cli import ArgumentParser, UsageError, run_main, setup_logging
from common.io import atomic_output, write_json

log = logging.getLogger("pipeline.assign")
MAX_LABEL = 2 ** 63 - 1


def load_centroids(stage_dir: Path) -> np.ndarray:
    path = Path(stage_dir) / "clusters" / "centroids.npy"
    if not path.exists():
        raise UsageError(f"{path}: no centroids; run pipeline.cluster first")
    return np.load(path)


def stage_meta(stage_dir: Path, stage_index: int, parent: Path | None,
               parent_meta: SidecarMeta | None = None) -> SidecarMeta:
    """What the sidecars of this stage must record (and readers expect); `parent_meta`, when
    the caller has it, saves computing the parent's again."""
    centroids = load_centroids(stage_dir)
    files = embedding_files(stage_dir)
    fps = {embeddings_model_fp(f) for f in files}
    if len(fps) != 1:
        raise UsageError(f"{stage_dir}/embeddings: files from {len(fps)} different models; re-embed")
    if parent is not None and parent_meta is None:
        parent_meta = stage_meta(parent, stage_index - 1, _grandparent(parent))
    ks = (parent_meta.ks if parent_meta else ()) + (int(centroids.shape[0]),)
    if np.prod([float(k) for k in ks]) > MAX_LABEL:
        raise UsageError(f"pseudo-labels of K = {ks} do not fit in int64")
    return SidecarMeta(stage=stage_index, k=int(centroids.shape[0]), ks=ks, model_fp=fps.pop(),
                       centroids_fp=array_fingerprint(centroids),
                       parent_fp=parent_meta.centroids_fp if parent_meta else "")


def stage_record(stage_dir: Path) -> tuple[int, Path | None]:
    """(stage index, parent stage folder) of a stage whose assign step has run."""
    record = Path(stage_dir) / "sidecars" / "_stage.json"
    if not record.exists():
        raise UsageError(f"{record}: missing; the assign step of {stage_dir} has not run")
    r = json.loads(record.read_text())
    return int(r["stage"]), (Path(r["parent"]) if r.get("parent") else None)


def _grandparent(parent: Path) -> Path | None:
    return stage_record(parent)[1]


def assign(stage_dir: str | Path, stage_index: int, parent: str | Path | None = None, task: int = 0,
           tasks: int = 1) -> list[Path]:
    """Write this task's sidecars; returns their paths."""
    stage_dir = Path(stage_dir)
    parent = Path(parent) if parent else None
    if not 0 <= task < tasks:
        raise UsageError(f"--task must be in [0, {tasks}), got {task}")
    parent_expect = stage_meta(parent, stage_index - 1, _grandparent(parent)) if parent else None
    meta = stage_meta(stage_dir, stage_index, parent, parent_expect)
    centroids = load_centroids(stage_dir).astype(np.float32)
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    write_json(stage_dir / "sidecars" / "_stage.json", {"stage": stage_index, "parent": str(parent or "")})
    files = embedding_files(stage_dir)[task::tasks]
    out, written = [], 0
    for f in files:
        path = stage_dir / "sidecars" / f"{f.stem}.parquet"
        out.append(path)
        for leftover in path.parent.glob(f".{path.name}.*.tmp"):  # a write cut short by a kill
            leftover.unlink(missing_ok=True)  # only this task writes this shard's sidecar
        if path.exists():
            try:
                check_sidecar(path, meta)
                continue  # current
            except Exception:  # noqa: BLE001 - stale, or a file cut short by a kill: rewrite it
                pass
        z = read_embeddings(f, ("embeddings", "keys"))
        keys = z["keys"].tolist()
        if len(keys):
            _, nearest = index.search(np.ascontiguousarray(z["embeddings"], dtype=np.float32), 1)
            clusters = nearest[:, 0].astype(np.int64)
        else:
            clusters = np.zeros(0, np.int64)
        labels = clusters.copy()
        if parent is not None:
            parent_path = parent / "sidecars" / f"{f.stem}.parquet"
            if not parent_path.exists():
                raise UsageError(f"{parent_path}: missing parent sidecar for shard {f.stem}")
            parent_labels = read_sidecar(parent_path, parent_expect)
            missing = [k for k in keys if k not in parent_labels]
            if missing:
                raise UsageError(f"{parent_path}: no entry for key {missing[0]} ({len(missing)} keys missing)")
            labels = np.array([parent_labels[k] for k in keys], dtype=np.int64) * meta.k + clusters
        write_sidecar(path, keys, clusters, labels, meta)
        written += 1
    log.info("task %d of %d: %d sidecars written, %d current", task, tasks, written, len(files) - written)
    return out


def reduce(stage_dir: str | Path, stage_index: int, parent: str | Path | None = None, data: str | None = None,
           batch_sizes: Sequence[int] = (64, 256, 1024), grid_per_cluster: int = 8) -> dict:
    """Group sizes, cluster sizes and NMI over all samples, and the cluster grid PNG."""
    stage_dir = Path(stage_dir)
    meta = stage_meta(stage_dir, stage_index, Path(parent) if parent else None)
    groups: collections.Counter = collections.Counter()
    cluster_sizes = np.zeros(meta.k, np.int64)
    assignments, attributes = [], []
    words: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    key_cluster: dict[str, int] = {}
    for f in embedding_files(stage_dir):
        path = stage_dir / "sidecars" / f"{f.stem}.parquet"
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
    sizes = sorted(groups.values())
    summary = {
        "stage": stage_index, "ks": list(meta.ks), "samples": int(sum(sizes)), "groups": len(sizes),
        "smallest_group": sizes[0] if sizes else 0, "largest_group": sizes[-1] if sizes else 0,
        "groups_smaller_than": {str(b): sum(1 for s in sizes if s < b) for b in batch_sizes},
        "samples_in_groups_smaller_than": {str(b): int(sum(s for s in sizes if s < b)) for b in batch_sizes},
    }
    write_json(stage_dir / "sidecars" / "_groups.json", {**summary, "sizes": {str(k): v for k, v in groups.items()}})
    top_words = {str(c): [w for w, _ in words[c].most_common(5)] for c in range(meta.k)}
    stats = {"stage": stage_index, "k": meta.k, "cluster_sizes": cluster_sizes.tolist(),
             "nmi": attribute_nmi(np.concatenate(assignments), attributes) if assignments else {},
             "purity": attribute_purity(np.concatenate(assignments), attributes) if assignments else {},
             "top_words": top_words, "groups": summary}
    write_json(stage_dir / "clusters" / "assign_stats.json", stats)
    if data:
        cluster_grid(data, key_cluster, top_words, cluster_sizes, stage_dir / "clusters" / "grid.png",
                     grid_per_cluster)
    log.info("stage %d: %d samples in %d groups (smallest %d, largest %d); groups below batch sizes %s; NMI %s",
             stage_index, summary["samples"], summary["groups"], summary["smallest_group"],
             summary["largest_group"], summary["groups_smaller_than"], stats["nmi"])
    return stats


_STOPWORDS = {"a", "an", "the", "of", "on", "in", "photo", "some", "at", "and", "with", "background", "pointing"}


def cluster_grid(data: str, key_cluster: dict[str, int], top_words: dict, sizes: np.ndarray, path: Path,
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
    p.add_argument("--stage-index", type=int, required=True, help="this stage's number s")
    p.add_argument("--parent", help="the previous stage's folder (its sidecars give c_1..c_{s-1})")
    p.add_argument("--reduce", action="store_true", help="summarise all sidecars (after every task)")
    p.add_argument("--data", help="with --reduce: shard spec, to draw the cluster grid PNG")
    add_task_args(p)
    args = p.parse_args(argv)
    setup_logging()
    if args.reduce:
        reduce(args.stage, args.stage_index, args.parent, args.data)
    else:
        assign(args.stage, args.stage_index, args.parent, args.task, args.tasks)
    return 0


if __name__ == "__main__":
    run_main(main, "python -m pipeline.assign")
