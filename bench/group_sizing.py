"""Groups against the global batch at CC12M scale: flat K against the split clustering.

    .venv/bin/python bench/group_sizing.py [--samples 12000000] [--calibrate-samples 300000]

At stage s the pseudo-label combines every earlier stage's cluster. Simulated group sizes
(pipeline.group_sizing.simulate_sizes: each group splits into its children with
Dirichlet(alpha) proportions, alpha 1 and 2; the split clustering's children planned by
split_sizes and received with the error of a balanced assignment fitted on 10% of each
group) give, per stage, the share of samples in pure steps (one group per global step), in
mixed steps (groups' leftovers) and in fallback (groups below one global batch, trained on
the parent label). Side by side, in this run, for W = 64 x B = 256 (G = 16,384) and the
paper's 8 x 1,000 (G = 8,000):

  flat      K = 10 at every stage (the paper's), and K = 1,000 in one clustering at stage 3
  split     the split clustering (cluster.mode: split, target 4 global batches a child)

The ratio printed is flat's fallback over split's (or flat's count when split has none).
Target at stage 3 with split: fallback <= 5%, pure >= 90%.

`--calibrate-samples` checks the simulation's assumption about the split clustering on a
real fit: Faiss k-means and the balanced assignment (pipeline.split_clusters) on that many
points of a Gaussian mixture (10 parents, d = 32), the global batch scaled with N, fitted on
10% of each parent and applied to all; its measured shares beside the simulated ones.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.group_sizing import (FORECAST_ALPHAS, SAMPLE_FRACTION, Shares, shares, simulate_sizes,  # noqa: E402
                                   split_sizes)

TARGET_BATCHES = 4.0


def row(name: str, found: Shares) -> str:
    return (f"  {name:<28} {found.groups:>6} groups  pure {100 * found.pure:5.1f}%  mixed {100 * found.mixed:5.1f}%  "
            f"fallback {100 * found.fallback:5.1f}%")


def simulated(n: int, ks: tuple, g: int, alpha: float, split: bool) -> Shares:
    sizes = simulate_sizes(n, ks, alpha, seed=0, global_batch=g, target_batches=TARGET_BATCHES if split else None)
    return shares(sizes, ks, g)


def calibrate(n: int, g: int, k: int = 10, d: int = 32, seed: int = 0) -> tuple[Shares, Shares]:
    """(measured, simulated) shares of a real split clustering of n mixture points under 10
    parents of Dirichlet(1) sizes: stage 2's children planned at global batch g."""
    import faiss

    from pipeline import split_clusters

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k * k, d)).astype(np.float32) * 3
    comp = rng.choice(k * k, size=n, p=rng.dirichlet([1.0] * (k * k)))
    x = (centres[comp] + rng.normal(size=(n, d))).astype(np.float32)
    km = faiss.Kmeans(d, k, niter=20, seed=seed, verbose=False)
    km.train(x)
    parents = km.index.search(x, 1)[1][:, 0].astype(np.int64)
    sizes = {int(p): int(c) for p, c in zip(*np.unique(parents, return_counts=True))}
    sample = np.concatenate([rng.choice(np.nonzero(parents == p)[0], max(1, int(c * SAMPLE_FRACTION)), replace=False)
                             for p, c in sizes.items()])
    centroids, parent, child, bias, _ = split_clusters.fit(x[sample], parents[sample], sizes, k, g, TARGET_BATCHES,
                                                           niter=20, seed=seed, spherical=False, gpu=False)
    children = split_clusters.assign(x, parents, centroids, parent, child, bias)
    labels = parents * k + children
    measured = shares({int(a): int(b) for a, b in zip(*np.unique(labels, return_counts=True))}, (k, k), g)
    # the simulation's model from the same parents: split_sizes' plan with the sample's error
    sim_split = {}
    plan_rng = np.random.default_rng(seed)
    for p, m in sizes.items():
        plan = np.array(split_sizes(m, k, g, TARGET_BATCHES), dtype=float)
        fitted = plan_rng.dirichlet(plan / m * max(m * SAMPLE_FRACTION, 1.0)) if len(plan) > 1 else np.ones(1)
        for j, c in enumerate(plan_rng.multinomial(m, fitted).tolist()):
            if c:
                sim_split[p * k + j] = c
    return measured, shares(sim_split, (k, k), g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=12_000_000)
    ap.add_argument("--calibrate-samples", type=int, default=300_000, help="0: skip the real fit")
    args = ap.parse_args()
    n = args.samples
    started = time.perf_counter()
    for world, batch in ((64, 256), (8, 1000)):
        g = world * batch
        print(f"N = {n:,}, W = {world} x B = {batch}: global batch G = {g:,}")
        for stage, ks in ((1, (10,)), (2, (10, 10)), (3, (10, 10, 10))):
            print(f" stage {stage} (labels of K = {list(ks)})")
            worst = {}
            for method, split in (("flat", False), ("split", True)):
                for alpha in FORECAST_ALPHAS:
                    found = simulated(n, ks, g, alpha, split)
                    print(row(f"{method} alpha={alpha:g}", found))
                    if worst.get(method) is None or found.fallback > worst[method].fallback:
                        worst[method] = found
            if stage == 3:
                for alpha in FORECAST_ALPHAS:
                    print(row(f"flat K=1000 alpha={alpha:g}", simulated(n, (1000,), g, alpha, False)))
            flat_fell, split_fell = (worst[m].samples * worst[m].fallback for m in ("flat", "split"))
            ratio_text = (f"{flat_fell / split_fell:.0f}x" if split_fell else
                          f"{flat_fell:,.0f} samples against none" if flat_fell else "none either way")
            verdict = ""
            if stage == 3:
                ok = worst["split"].fallback <= 0.05 and worst["split"].pure >= 0.90
                verdict = f"; split meets fallback <= 5% and pure >= 90%: {'yes' if ok else 'NO'}"
            print(f"  worse alpha: fallback flat {100 * worst['flat'].fallback:.1f}% / split "
                  f"{100 * worst['split'].fallback:.1f}% ({ratio_text}); pure flat {100 * worst['flat'].pure:.1f}% "
                  f"vs split {100 * worst['split'].pure:.1f}%{verdict}")
    print(f"simulated in {time.perf_counter() - started:.1f} s")
    if args.calibrate_samples:
        m = args.calibrate_samples
        g = max(2, round(16_384 * m / 12_000_000))
        started = time.perf_counter()
        measured, sim = calibrate(m, g)
        print(f"calibration: a real split clustering of {m:,} points (10 parents, d = 32) at G = {g} "
              f"(16,384 scaled by N), fitted on {100 * SAMPLE_FRACTION:g}% of each parent "
              f"({time.perf_counter() - started:.1f} s)")
        print(row("measured (Faiss + balance)", measured))
        print(row("simulated from its parents", sim))


if __name__ == "__main__":
    main()
