"""Clustering speed: Faiss k-means + assignment against scikit-learn's MiniBatchKMeans.

    .venv/bin/python bench/cluster_speed.py [--n 200000] [--dim 512] [--k 10]

The reference MCL implementation clusters with sklearn's MiniBatchKMeans (in memory,
defaults, K = 10). Both run here on the same embeddings: L2-normalised float32 points
drawn around 64 latent centres (web embeddings are clumpy, not uniform), n x dim. Each
method fits K centroids and assigns every point; the objective is the same for both, the
sum of squared distances of all n points to their nearest centroid, computed exactly.
Faiss runs as pipeline.cluster + pipeline.assign do: k-means on a uniform sample of
--sample-size points (default 1024 x K, the pipeline's default), then every point
assigned; spherical=False so the objectives compare. sklearn fits and predicts on all
points, as the reference does. Prints times, objectives and the ratios.
Targets: >= 10x faster, objective no more than 1% worse.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import faiss
import numpy as np


def make_points(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, dim)).astype(np.float32)
    x = centres[rng.integers(64, size=n)] + 0.8 * rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32)


def objective(x: np.ndarray, centroids: np.ndarray) -> float:
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    d, _ = index.search(x, 1)
    return float(d.sum())


def run_faiss(x: np.ndarray, k: int, niter: int, seed: int, sample_size: int):
    t = time.perf_counter()
    m = min(sample_size, len(x))
    sample = x[np.sort(np.random.default_rng(seed).choice(len(x), size=m, replace=False))]
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, max_points_per_centroid=math.ceil(m / k) + 1)
    km.train(sample)
    _, labels = km.index.search(x, 1)
    return time.perf_counter() - t, km.centroids, labels[:, 0]


def run_sklearn(x: np.ndarray, k: int, seed: int):
    from sklearn.cluster import MiniBatchKMeans

    t = time.perf_counter()
    km = MiniBatchKMeans(n_clusters=k, random_state=seed)
    labels = km.fit_predict(x)
    return time.perf_counter() - t, km.cluster_centers_, labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sample-size", type=int, help="faiss training sample (default 1024 x K)")
    args = p.parse_args()
    x = make_points(args.n, args.dim, args.seed)
    sample_size = args.sample_size or 1024 * args.k
    print(f"{args.n} x {args.dim} float32, K={args.k}, faiss sample {min(sample_size, args.n)}, "
          f"faiss threads {faiss.omp_get_max_threads()}, cpus {os.cpu_count()}")
    rows = {"faiss": [], "sklearn": []}
    for r in range(args.repeats):  # alternate, so both see the same machine noise
        tf, cf, _ = run_faiss(x, args.k, args.niter, args.seed + r, sample_size)
        ts, cs, _ = run_sklearn(x, args.k, args.seed + r)
        rows["faiss"].append((tf, objective(x, cf)))
        rows["sklearn"].append((ts, objective(x, cs)))
        print(f"repeat {r}: faiss {tf:.2f}s obj {rows['faiss'][-1][1]:.1f} | "
              f"sklearn MiniBatchKMeans {ts:.2f}s obj {rows['sklearn'][-1][1]:.1f}", flush=True)
    tf = float(np.median([t for t, _ in rows["faiss"]]))
    ts = float(np.median([t for t, _ in rows["sklearn"]]))
    of = float(np.median([o for _, o in rows["faiss"]]))
    os_ = float(np.median([o for _, o in rows["sklearn"]]))
    print(f"median time: faiss {tf:.2f}s, sklearn {ts:.2f}s; speed ratio sklearn/faiss = {ts / tf:.1f}x "
          "(target >= 10)")
    print(f"median objective: faiss {of:.1f}, sklearn {os_:.1f}; faiss/sklearn = {of / os_:.4f} "
          "(target <= 1.01)")


if __name__ == "__main__":
    main()
