"""The split clustering: each parent group cut into children sized for the global batch.

The paper's stage s clusters the samples "within the cluster they were assigned to in
preceding stages". Flat k-means with a fixed K does this only through the packed label
(parent x K + cluster), and its children come in whatever sizes k-means finds: at CC12M
scale and a global batch of 16,384, a fifth to a third of stage 3's samples fall into groups
too small for one step and train on their parent's label (pipeline.group_sizing).

Here every parent group is clustered on its own: k-means (Faiss) on the group's sampled
points, its number of children and their sizes planned from the group's size
(pipeline.group_sizing.split_sizes: whole global batches each), then a balanced assignment:
an offset per child (`bias`), fitted on the sample so that "the child of the highest
x.c - |c|^2/2 - bias" receives the planned share of the group. The assign job applies the
same rule to every sample (only its own parent's children compete), so the full data's
children come out within the sample's error of the plan.

Arrays (clusters/children.npz beside clusters/centroids.npy, row for row):
    parent  int64 [C]   the packed parent label each centroid belongs to
    child   int32 [C]   its index among its parent's children (the label's last digit)
    bias    float32 [C] its offset in the assignment rule
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import faiss
import numpy as np

from common.io import atomic_output
from pipeline.group_sizing import split_sizes

log = logging.getLogger("pipeline.cluster")


def scores(x: np.ndarray, centroids: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """x.c - |c|^2/2 - bias for every point and centroid (the nearest centroid, offset)."""
    return x @ centroids.T - 0.5 * (centroids ** 2).sum(1)[None, :] - bias[None, :]


def fit_bias(s: np.ndarray, target: np.ndarray, iterations: int = 400) -> np.ndarray:
    """Offsets b such that argmax(s - b) gives each column about its `target` share of
    the rows (s: scores without offsets). Prices rise on over-full children."""
    k = s.shape[1]
    b = np.zeros(k, np.float32)
    step = float(np.std(s)) or 1.0
    best, best_err = b.copy(), np.inf
    for _ in range(iterations):
        frac = np.bincount(np.argmax(s - b, axis=1), minlength=k) / len(s)
        err = float(np.abs(frac - target).max())
        if err < best_err:
            best, best_err = b.copy(), err
        if err <= 0.5 / len(s):
            break
        b += step * (frac - target).astype(np.float32)
        step *= 0.98
    return best


def fit(x: np.ndarray, parents: np.ndarray, parent_sizes: dict[int, int], k: int, global_batch: int,
        target_batches: float, niter: int, seed: int, spherical: bool, gpu: bool):
    """(centroids [C, d], parent [C], child [C], bias [C], planned sizes per centroid) for the
    sampled points `x` of parent labels `parents`; every parent group of `parent_sizes`
    gets at least one centroid."""
    d = x.shape[1]
    out_c, out_parent, out_child, out_bias, out_plan = [], [], [], [], []
    for label in sorted(parent_sizes):
        n = int(parent_sizes[label])
        pts = x[parents == label]
        plan = split_sizes(n, k, global_batch, target_batches)
        if len(plan) > 1 and len(pts) < 8 * len(plan):  # too few points to place the children
            plan = [n]
        if len(plan) == 1:
            mean = pts.mean(0) if len(pts) else np.zeros(d, np.float32)
            if spherical and np.linalg.norm(mean) > 0:
                mean = mean / np.linalg.norm(mean)
            centroids, bias = mean[None, :].astype(np.float32), np.zeros(1, np.float32)
        else:
            km = faiss.Kmeans(d, len(plan), niter=niter, seed=seed, spherical=spherical, gpu=gpu,
                              max_points_per_centroid=math.ceil(len(pts) / len(plan)) + 1, verbose=False)
            km.train(np.ascontiguousarray(pts, dtype=np.float32))
            centroids = km.centroids.astype(np.float32)
            # the largest planned child to the most populous centroid: the offsets stay small
            natural = np.bincount(np.argmax(scores(pts, centroids, np.zeros(len(plan), np.float32)), 1),
                                  minlength=len(plan))
            centroids = centroids[np.argsort(-natural, kind="stable")]
            target = np.sort(np.array(plan, dtype=np.float64))[::-1] / n
            plan = (target * n).round().astype(int).tolist()
            bias = fit_bias(scores(pts, centroids, np.zeros(len(plan), np.float32)), target)
        out_c.append(centroids)
        out_parent += [label] * len(plan)
        out_child += list(range(len(plan)))
        out_bias.append(bias)
        out_plan += plan
    return (np.concatenate(out_c), np.array(out_parent, np.int64), np.array(out_child, np.int32),
            np.concatenate(out_bias).astype(np.float32), out_plan)


def assign(x: np.ndarray, parents: np.ndarray, centroids: np.ndarray, parent: np.ndarray, child: np.ndarray,
           bias: np.ndarray) -> np.ndarray:
    """The child index of each point among its own parent's children (the centroid rows of
    a parent are contiguous, in `parent`'s sorted order)."""
    out = np.zeros(len(x), np.int64)
    labels, starts = np.unique(parent, return_index=True)
    ends = np.append(starts[1:], len(parent))
    where = np.searchsorted(labels, parents)
    found = (where < len(labels)) & (labels[np.minimum(where, len(labels) - 1)] == parents)
    if not found.all():
        missing = int(parents[~found][0])
        raise ValueError(f"parent label {missing} has no children (clustered before that group existed?)")
    for i, (lo, hi) in enumerate(zip(starts, ends)):
        rows = np.nonzero(where == i)[0]
        if len(rows) == 0:
            continue
        if hi - lo == 1:
            out[rows] = child[lo]
            continue
        s = scores(np.asarray(x[rows], np.float32), centroids[lo:hi], bias[lo:hi])
        out[rows] = child[lo:hi][np.argmax(s, axis=1)]
    return out


def save(path: Path, parent: np.ndarray, child: np.ndarray, bias: np.ndarray) -> None:
    with atomic_output(path, "wb") as f:
        np.savez(f, parent=parent, child=child, bias=bias)


def load(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return z["parent"], z["child"], z["bias"]
