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

from pipeline.artifacts import embeddings_model_fp, read_embeddings
from pipeline.metrics import attribute_nmi
from pipeline.stage import StageDir
from common.cli import UsageError, run_main, setup_logging
from common.io import atomic_output, write_json
from common.spec import check, from_args, param, parser, result_fields

log = logging.getLogger("pipeline.cluster")


def uniform_sample(files: list[Path], size: int, seed: int, with_attributes: bool = True):
    """(points float32 [m, d], attributes list[str]) drawn uniformly from all files."""
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
        z = read_embeddings(f, ("embeddings", "attributes") if with_attributes else ("embeddings",))
        idx = chosen[lo:hi] - starts[i]
        points.append(z["embeddings"][idx].astype(np.float32))
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

    def problems(self) -> list[str]:
        return [f"{name}: must be >= {low}, got {getattr(self, name)}" for name, low in
                (("k", 2), ("niter", 1), ("seed", 0), ("sample_size", 1))
                if getattr(self, name) is not None and getattr(self, name) < low]


def cluster_params(spec: ClusterSpec) -> dict:
    """What the centroids are a function of; stats.json records it."""
    stage = StageDir(spec.stage)
    files = stage.embedding_files()
    fps = sorted({embeddings_model_fp(f) or "" for f in files})
    if len(fps) != 1 or not fps[0]:
        raise UsageError(f"{stage.embeddings_dir}: files from {len(fps)} different models "
                         f"(or unreadable); rerun pipeline.embed")
    return {**result_fields(spec), "sample_size": spec.sample_size or 1024 * spec.k,
            "shards": [f.stem for f in files], "model_fp": fps[0]}


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
    x, attrs, total = uniform_sample(files, sample_size, spec.seed)
    if len(x) < k:
        raise UsageError(f"--k {k} is more than the {len(x)} samples")
    t_sample = time.time() - t0
    use_gpu = faiss.get_num_gpus() > 0 if spec.gpu is None else spec.gpu
    kmeans = faiss.Kmeans(x.shape[1], k, niter=spec.niter, seed=spec.seed, spherical=spec.spherical, gpu=use_gpu,
                          max_points_per_centroid=math.ceil(len(x) / k) + 1, verbose=False)
    t1 = time.time()
    kmeans.train(x)
    t_train = time.time() - t1
    _, assign = kmeans.index.search(x, 1)
    assign = assign[:, 0]
    sizes = np.bincount(assign, minlength=k)
    stats = {
        "params": params, "k": k, "dim": int(x.shape[1]), "samples_total": total,
        "samples_trained": int(len(x)), "faiss_max_points_per_centroid": math.ceil(len(x) / k) + 1,
        "objective": float(kmeans.obj[-1]) if len(kmeans.obj) else None,
        "time_sample_s": round(t_sample, 3), "time_train_s": round(t_train, 3), "gpu": bool(use_gpu),
        "sample_cluster_sizes": sizes.tolist(), "empty_clusters": int((sizes == 0).sum()),
        "nmi_sample": attribute_nmi(assign, attrs),
    }
    stage.cluster_stats.unlink(missing_ok=True)  # the record goes first: new centroids never pass for old ones
    with atomic_output(stage.centroids, "wb") as f:
        np.save(f, kmeans.centroids.astype(np.float32))
    write_json(stage.cluster_stats, stats)
    log.info("k-means K=%d on %d of %d samples (dim %d) in %.1fs, objective %.4g%s", k, len(x), total, x.shape[1],
             t_train, stats["objective"] or float("nan"),
             f"; NMI {stats['nmi_sample']}" if stats["nmi_sample"] else "")
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    args = parser(ClusterSpec, "python -m pipeline.cluster", __doc__).parse_args(argv)
    setup_logging()
    cluster(from_args(ClusterSpec, args))
    return 0


if __name__ == "__main__":
    run_main(main, "python -m pipeline.cluster")
