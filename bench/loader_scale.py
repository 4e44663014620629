"""The batching policies at scale, simulated without images: keys, labels and nothing else.

    .venv/bin/python bench/loader_scale.py [--samples 1000000] [--groups 1000] [--world 64]
                                           [--batch 256] [--workers 8]

A stage-4 run of K = 10: 1,000 pseudo-label groups (c1, c2, c3) of Zipf-like sizes
(p ~ 1/rank), the samples spread at random over 1,000 shards. W ranks x B per rank, each
rank with `--workers` DataLoader workers. Side by side, in this run:

  global     pipeline.loader.global_batches: every rank computes one seeded plan of global steps
             from one group each; nothing dropped (small groups fall back to their parent;
             leftovers go to masked mixed steps)
  per-slot   pipeline.loader.buckets, as the loader has done so far: each (rank x worker) slot
             buckets its own striped shards (cap 16 x B); groups below B x W x workers fall
             back; the global batch is W ranks' batches, one group each
  reference  the official code's MCL_batch_sampler_DDP policy: each group cut into global
             batches, its remainder (and every group below one global batch) dropped

Per policy: share of pure global steps; share of samples in pure steps among those whose
group holds at least one global batch (goal >= 95%); effective negatives per anchor (mean);
samples that fall back, samples dropped; peak samples buffered per worker (global and
reference: one batch, read by index; per-slot: the bucketing's own peak), at two data set
sizes ten times apart (goal: flat); the per-sample metadata a rank holds (index MB: global,
the plan's int64 and the 36-byte index entry of every sample; reference, its index list;
per-slot, none: labels are joined per shard as it streams); the time to plan one epoch.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.loader.buckets import BucketStats, plan_batches  # noqa: E402
from pipeline.loader.groups import coarsen_labels  # noqa: E402
from pipeline.loader.global_batches import PAD, plan_epoch  # noqa: E402
from pipeline.loader.groups import coarse_groups  # noqa: E402

KS = (10, 10, 10)


def make_world(samples: int, groups: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(packed labels, shard of each sample): Zipf-like group sizes, samples shuffled over 1,000 shards."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, groups + 1)
    labels = rng.permutation(groups)[rng.choice(groups, size=samples, p=p / p.sum())]
    shard = rng.permutation(np.arange(samples) * 1000 // samples)
    return labels.astype(np.int64), shard


def negatives(gathered: np.ndarray) -> tuple[int, int]:
    """(sum over valid anchors of their unmasked negatives, anchors) for one global batch."""
    valid = gathered[gathered != PAD]
    _, counts = np.unique(valid, return_counts=True)
    return int((counts * (counts - 1)).sum()), len(valid)


def report(name: str, steps: list[np.ndarray], eligible: np.ndarray, labels_of, fallback: int, dropped: int,
           peak: int, seconds: float, metadata_mb: float) -> dict:
    pure = [s for s in steps if (s != PAD).all() and len(np.unique(labels_of(s))) == 1]
    in_pure = np.zeros(len(eligible), bool)
    for s in pure:
        in_pure[s] = True
    counted = [negatives(labels_of(s[s != PAD])) for s in steps]
    neg, anchors = sum(c[0] for c in counted), sum(c[1] for c in counted)
    return dict(policy=name, steps=len(steps), pure_steps=len(pure) / max(1, len(steps)),
                eligible_pure=in_pure[eligible].mean() if eligible.any() else float("nan"),
                negatives=neg / max(1, anchors), fallback=fallback, dropped=dropped, peak=peak, seconds=seconds,
                metadata_mb=metadata_mb)


def global_policy(packed, shard, world, batch, workers, seed=0) -> dict:
    t = time.perf_counter()
    g = world * batch
    group, parent, fell = coarse_groups(packed, KS, g)
    plan = plan_epoch(group, parent, g, seed, 0, fell)
    seconds = time.perf_counter() - t
    _, inverse, counts = np.unique(packed, return_inverse=True, return_counts=True)
    eligible = counts[inverse] >= g
    return report("global", list(plan.steps), eligible, lambda s: group[s],
                  plan.stats.fallback_samples, 0, batch, seconds, len(packed) * (8 + 36) / 2**20)


def per_slot_policy(packed, shard, world, batch, workers, seed=0) -> dict:
    t = time.perf_counter()
    slots, g = world * workers, world * batch
    values, inverse, counts = np.unique(packed, return_inverse=True, return_counts=True)
    mapping = coarsen_labels(dict(zip(values.tolist(), counts.tolist())), KS, batch * world * workers)
    coarse = np.array([hash(mapping[v]) for v in values.tolist()], dtype=np.int64)[inverse]
    parent_of = {v: (mapping[v][0] - 1, mapping[v][1] // KS[mapping[v][0] - 1]) if mapping[v][0] else mapping[v]
                 for v in values.tolist()}
    parent = np.array([hash(parent_of[v]) for v in values.tolist()], dtype=np.int64)[inverse]
    fallback = int(sum(n for v, n in zip(values.tolist(), counts.tolist()) if mapping[v][0] < len(KS)))
    rng = np.random.default_rng(seed)
    by_shard = np.argsort(shard, kind="stable")
    bounds = np.searchsorted(shard[by_shard], np.arange(shard.max() + 2))
    rank_batches = [[] for _ in range(world)]
    peak = 0
    for rank in range(world):
        per_worker = []
        for worker in range(workers):
            slot = rank * workers + worker
            mine = np.concatenate([by_shard[bounds[s]:bounds[s + 1]] for s in range(slot, shard.max() + 1, slots)])
            mine = mine[rng.permutation(len(mine))]   # a shuffle buffer as large as the slot's data
            stats = BucketStats()
            per_worker.append([np.array(b) for b in plan_batches(((coarse[i], parent[i], i) for i in mine.tolist()),
                                                                 batch, 16 * batch, stats)])
            peak = max(peak, stats.max_buffered)
        for i in range(max(map(len, per_worker))):  # the DataLoader's round-robin over workers
            rank_batches[rank] += [w[i] for w in per_worker if i < len(w)]
    steps = []
    for i in range(max(map(len, rank_batches))):
        parts = [b[i] if i < len(b) else np.full(batch, PAD) for b in rank_batches]
        steps.append(np.concatenate([np.pad(p, (0, batch - len(p)), constant_values=PAD) for p in parts]))
    seconds = time.perf_counter() - t
    eligible = counts[inverse] >= g
    return report("per-slot", steps, eligible, lambda s: coarse[s], fallback, 0, peak, seconds, 0.0)


def reference_policy(packed, shard, world, batch, workers, seed=0) -> dict:
    t = time.perf_counter()
    g = world * batch
    rng = np.random.default_rng(seed)
    steps, dropped = [], 0
    for value in np.unique(packed):
        members = rng.permutation(np.flatnonzero(packed == value))
        whole = len(members) // g * g
        dropped += len(members) - whole
        steps += list(members[:whole].reshape(-1, g))
    seconds = time.perf_counter() - t
    _, inverse, counts = np.unique(packed, return_inverse=True, return_counts=True)
    return report("reference", steps, counts[inverse] >= g, lambda s: packed[s], 0, dropped, batch, seconds,
                  len(packed) * 8 / 2**20)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1_000_000)
    p.add_argument("--groups", type=int, default=1000)
    p.add_argument("--world", type=int, default=64)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=8)
    args = p.parse_args(argv)
    print(f"{args.groups} groups (Zipf-like), W={args.world} x B={args.batch} (global batch "
          f"{args.world * args.batch}), {args.workers} workers per rank")
    header = (f"{'samples':>9} {'policy':<10} {'steps':>6} {'pure steps':>10} {'pure|eligible':>13} "
              f"{'negatives':>10} {'fallback':>9} {'dropped':>8} {'peak/worker':>11} {'index MB':>9} {'plan s':>7}")
    print(header)
    for samples in (args.samples // 10, args.samples):
        packed, shard = make_world(samples, args.groups)
        for policy in (global_policy, per_slot_policy, reference_policy):
            r = policy(packed, shard, args.world, args.batch, args.workers)
            print(f"{samples:>9} {r['policy']:<10} {r['steps']:>6} {r['pure_steps']:>10.1%} {r['eligible_pure']:>13.1%} "
                  f"{r['negatives']:>10.0f} {r['fallback']:>9} {r['dropped']:>8} {r['peak']:>11} "
                  f"{r['metadata_mb']:>9.1f} {r['seconds']:>7.1f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
