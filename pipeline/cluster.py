"""Faiss k-means on a bounded uniform sample of a stage's embeddings.

    python -m pipeline.cluster --stage runs/r/stage1 --k 10 [--sample-size 200000]

Reads `STAGE/embeddings/*.npz` twice: once for the counts, once to gather a uniform
sample (without replacement, across all shards) of at most --sample-size points, so
memory is bounded by the sample and one shard, not the data set. Trains `faiss.Kmeans`
on it, on the GPU when `faiss.get_num_gpus() > 0`. Faiss silently subsamples its
training set to `max_points_per_centroid` x K; here that bound is set from the sample
size on purpose (every sampled point is used) and reported.

Writes `STAGE/clusters/centroids.npy` and `STAGE/clusters/stats.json`: K, iterations,
sample size, objective, time, cluster sizes in the sample and, when samples carry
attribute labels (the synthetic world does), the normalised mutual information between
the clusters and each attribute: which feature the stage separated.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Sequence

import faiss
import numpy as np

from pipeline import split_clusters
from pipeline.artifacts import embeddings_model_fp, read_embeddings
from pipeline.metrics import attribute_nmi
from pipeline.stage import StageDir
from common.cli import UsageError, run_main, setup_logging
from common.io import atomic_output, write_json
from common.spec import check, from_args, param, parser, result_fields

log = logging.getLogger("pipeline.cluster")
MODES = ("flat", "split")
SPLIT_FIELDS = ("mode", "global_batch", "target_batches")


def uniform_sample(files: list[Path], size: int, seed: int, with_attributes: bool = True, keys: list | None = None):
    """(points float32 [m, d], attributes list[str], total) drawn uniformly from all files;
    `keys`, a list, receives (file, key) of each point."""
    counts = np.array([len(read_embeddings(f, ("keys",))["keys"]) for f in files])
    total = int(counts.sum())
    if total == 0:
        raise UsageError("the embeddings hold no samples")
    m = min(size, total)
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=m, replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    points, attrs = [], []
    for i, f in enumerate(files):
        lo, hi = np.searchsorted(chosen, [starts[i], starts[i + 1]])
        if lo == hi:
            continue
        z = read_embeddings(f, ("embeddings", "keys") + (("attributes",) if with_attributes else ()))
        idx = chosen[lo:hi] - starts[i]
        points.append(z["embeddings"][idx].astype(np.float32))
        if keys is not None:
            keys += [(f, k) for k in z["keys"][idx].tolist()]
        if with_attributes:
            attrs += z["attributes"][idx].tolist()
    return np.concatenate(points), attrs, total


@dataclass(frozen=True)
class ClusterSpec:
    """The clustering of one stage's embeddings."""
    stage: str = param(help="stage folder holding embeddings/", result=False)
    k: int = param(help="number of clusters")
    niter: int = param(20, "k-means iterations")
    seed: int = param(0, "seed of the sample and of k-means")
    sample_size: int | None = param(None, "points to train on (default 1024 x K; Faiss alone would cap it at 256 x K)")
    spherical: bool = param(True, "spherical k-means (centroids normalised), for L2-normalised embeddings")
    gpu: bool | None = param(None, "train on the GPU (default: when Faiss sees one)", result=False)
    mode: str = param("flat", "flat: K clusters over all samples; split: each parent group cut into at most K "
                      "children sized for the global batch (pipeline.split_clusters)", choices=MODES)
    parent: str | None = param(None, "split: the previous stage's folder (its groups are cut; none: one group)",
                               result=False)
    global_batch: int | None = param(None, "split: the global batch of the stage trained on these labels")
    target_batches: float = param(4.0, "split: children of about this many global batches")

    def problems(self) -> list[str]:
        errors = [f"{name}: must be >= {low}, got {getattr(self, name)}" for name, low in
                  (("k", 2), ("niter", 1), ("seed", 0), ("sample_size", 1), ("global_batch", 1))
                  if getattr(self, name) is not None and getattr(self, name) < low]
        if self.mode == "split" and self.global_batch is None:
            errors.append("global_batch: the split clustering needs the global batch it sizes children for")
        if self.target_batches < 1:
            errors.append(f"target_batches: must be >= 1, got {self.target_batches}")
        return errors


def cluster_params(spec: ClusterSpec) -> dict:
    """What the centroids are a function of; stats.json records it."""
    stage = StageDir(spec.stage)
    files = stage.embedding_files()
    fps = sorted({embeddings_model_fp(f) or "" for f in files})
    if len(fps) != 1 or not fps[0]:
        raise UsageError(f"{stage.embeddings_dir}: files from {len(fps)} different models "
                         f"(or unreadable); rerun pipeline.embed")
    params = {**result_fields(spec), "sample_size": spec.sample_size or default_sample_size(spec),
              "shards": [f.stem for f in files], "model_fp": fps[0]}
    if spec.mode == "flat":  # the record of a flat clustering is what it was before split existed
        return {k: v for k, v in params.items() if k not in SPLIT_FIELDS}
    params["parent_record"] = _parent_record(spec)
    return params


def default_sample_size(spec: ClusterSpec) -> int:
    """1024 points per cluster; split: per possible child of every parent group, and at
    least a tenth of the data (each group's children are fitted on its own points)."""
    if spec.mode == "flat":
        return 1024 * spec.k
    groups = len(_parent_sizes(spec)) if spec.parent else 1
    total = sum(_parent_sizes(spec).values()) if spec.parent else 0
    return max(1024 * spec.k * groups, total // 10)


def _parent_record(spec: ClusterSpec) -> str:
    from pipeline.stage import current_record

    return current_record(StageDir(spec.parent)).meta.to_json("").decode() if spec.parent else ""


def _parent_sizes(spec: ClusterSpec) -> dict[int, int]:
    """{packed label: samples} of the parent stage's groups (its reduce step's record)."""
    groups = StageDir(spec.parent).groups
    if not groups.is_file():
        raise UsageError(f"{groups}: missing; run the reduce step of {spec.parent} first")
    return {int(k): int(v) for k, v in json.loads(groups.read_text())["sizes"].items()}


def is_done(spec: ClusterSpec) -> bool:
    """The centroids exist for these parameters and these embeddings."""
    stage = StageDir(spec.stage)
    try:
        return stage.centroids.is_file() and \
            json.loads(stage.cluster_stats.read_text()).get("params") == cluster_params(spec)
    except (UsageError, OSError, ValueError):
        return False


def cluster(spec: ClusterSpec) -> dict:
    """Train the centroids of a stage; skipped when they exist for the same parameters."""
    k = spec.k
    check(spec)
    stage = StageDir(spec.stage)
    params = cluster_params(spec)
    sample_size = params["sample_size"]
    files = stage.embedding_files()
    if is_done(spec):
        log.info("%s: centroids already trained, skipped", stage.clusters_dir)
        return json.loads(stage.cluster_stats.read_text())
    t0 = time.time()
    keys: list = []
    x, attrs, total = uniform_sample(files, sample_size, spec.seed, keys=keys if spec.mode == "split" else None)
    if len(x) < k and spec.mode == "flat":
        raise UsageError(f"--k {k} is more than the {len(x)} samples")
    t_sample = time.time() - t0
    use_gpu = faiss.get_num_gpus() > 0 if spec.gpu is None else spec.gpu
    t1 = time.time()
    if spec.mode == "split":
        centroids, children, assign, extra = _split(spec, x, keys, total, use_gpu)
        objective = None
    else:
        kmeans = faiss.Kmeans(x.shape[1], k, niter=spec.niter, seed=spec.seed, spherical=spec.spherical,
                              gpu=use_gpu, max_points_per_centroid=math.ceil(len(x) / k) + 1, verbose=False)
        kmeans.train(x)
        centroids, children, extra = kmeans.centroids.astype(np.float32), None, {}
        objective = float(kmeans.obj[-1]) if len(kmeans.obj) else None
        assign = kmeans.index.search(x, 1)[1][:, 0]
    t_train = time.time() - t1
    sizes = np.bincount(assign, minlength=len(centroids))
    stats = {
        "params": params, "k": k, "mode": spec.mode, "centroids": int(len(centroids)), "dim": int(x.shape[1]),
        "samples_total": total, "samples_trained": int(len(x)),
        "faiss_max_points_per_centroid": math.ceil(len(x) / k) + 1, "objective": objective,
        "time_sample_s": round(t_sample, 3), "time_train_s": round(t_train, 3), "gpu": bool(use_gpu),
        "sample_cluster_sizes": sizes.tolist(), "empty_clusters": int((sizes == 0).sum()),
        "nmi_sample": attribute_nmi(assign, attrs), **extra,
    }
    stage.cluster_stats.unlink(missing_ok=True)  # the record goes first: new centroids never pass for old ones
    with atomic_output(stage.centroids, "wb") as f:
        np.save(f, centroids)
    if children is not None:
        split_clusters.save(stage.children, *children)
    else:
        stage.children.unlink(missing_ok=True)
    write_json(stage.cluster_stats, stats)
    log.info("k-means K=%d on %d of %d samples (dim %d) in %.1fs, objective %.4g%s", k, len(x), total, x.shape[1],
             t_train, stats["objective"] or float("nan"),
             f"; NMI {stats['nmi_sample']}" if stats["nmi_sample"] else "")
    return stats


def _split(spec: ClusterSpec, x: np.ndarray, keys: list, total: int, gpu: bool):
    """The split clustering of the sample: (centroids, (parent, child, bias), each point's
    centroid row, stats)."""
    from pipeline.artifacts import read_sidecar

    if spec.parent:
        sizes = _parent_sizes(spec)
        labels: dict = {}
        for f in dict.fromkeys(f for f, _ in keys):
            labels[f] = read_sidecar(StageDir(spec.parent).sidecar_of(f))
        parents = np.array([labels[f][key] for f, key in keys], dtype=np.int64)
    else:
        sizes, parents = {0: total}, np.zeros(len(x), np.int64)
    centroids, parent, child, bias, planned = split_clusters.fit(
        x, parents, sizes, spec.k, spec.global_batch, spec.target_batches, spec.niter, spec.seed, spec.spherical, gpu)
    rows = np.searchsorted(parent, parents) + split_clusters.assign(x, parents, centroids, parent, child, bias)
    log.info("split clustering: %d parent groups cut into %d children of about %g global batches of %d",
             len(sizes), len(centroids), spec.target_batches, spec.global_batch)
    return centroids, (parent, child, bias), rows, {"planned_sizes": planned, "parent_groups": len(sizes)}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser(ClusterSpec, "python -m pipeline.cluster", __doc__).parse_args(argv)
    setup_logging()
    cluster(from_args(ClusterSpec, args))
    return 0


if __name__ == "__main__":
    run_main(main, "python -m pipeline.cluster")
