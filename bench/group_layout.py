"""The streamed group layout at CC12M scale, simulated on labels alone (no images).

    .venv/bin/python bench/group_layout.py [--samples 12000000] [--shard-samples 10000]

pipeline.loader.group_layout lays a stage's samples out by pseudo-label group in files a
rank reads whole, once per epoch. For 12 M samples, W = 64 x B = 256 and the paper's 8 x
1,000, on the group sizes pipeline.group_sizing simulates (stage 3 of the split clustering:
groups of about 4 global batches; stage 1's 10 groups of about 1.2 M; stage 3 of flat K = 10,
Dirichlet alpha = 1, groups below one global batch fallen back), chunks of 8 steps, side by
side:

  streamed   the layout: requests per rank per epoch (files it opens), the files the
             regroup writes and their sizes (samples), samples a worker holds
  global     bucket=global: one request per sample (a seek and a read of its byte span)
  plain      plain webdataset over the original shards of `--shard-samples` samples

and the share of samples in pure steps of each (streamed and global follow the same policy:
they must be equal). The ratio printed is streamed's requests over plain's (target <= 1.5).

The epoch-to-epoch change of the batches is measured on a copy scaled down 60x (same groups
per global batch): the mean share of an anchor's negatives in epoch 2 that it met in epoch 1,
streamed against the global plan's whole-group reshuffle (target: within 2x).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.group_sizing import shares, simulate_sizes  # noqa: E402
from pipeline.loader.global_batches import plan_epoch  # noqa: E402
from pipeline.loader.group_layout import epoch_steps, lay_out, negative_overlap  # noqa: E402
from pipeline.loader.groups import coarse_groups  # noqa: E402

CHUNK_STEPS = 8


def labels(n: int, ks: tuple, g: int, split: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(coarse group, parent) per sample of simulated group sizes, small groups fallen back."""
    sizes = simulate_sizes(n, ks, 1.0, seed, g, 4.0 if split else None)
    packed = np.repeat(np.array(list(sizes), np.int64), list(sizes.values()))
    group, parent, _ = coarse_groups(packed, ks, g)
    return group, parent


def scale_row(name: str, n: int, ks: tuple, world: int, batch: int, split: bool, shard_samples: int) -> None:
    g = world * batch
    group, parent = labels(n, ks, g, split)
    started = time.perf_counter()
    layout = lay_out(group, parent, world, batch, CHUNK_STEPS, max(1, shard_samples // batch), seed=0)
    took = time.perf_counter() - started
    files = layout.file_sizes()
    requests = files.shape[0]                                    # a rank opens one file per bundle
    plain = -(-n // shard_samples) / world
    worker = int(layout.part_sizes().max())
    groups = len(np.unique(group))
    measured = shares(dict(zip(*[a.tolist() for a in np.unique(group, return_counts=True)])), (), g)
    print(f"  {name:<26} {groups:>6} groups  pure {100 * layout.pure_samples / n:5.1f}% (global "
          f"{100 * measured.pure:5.1f}%)  requests/rank/epoch: streamed {requests:,} global {n // world:,} "
          f"plain {plain:,.1f} ({requests / plain:.2f}x plain)  files {files.size:,} of "
          f"{int(files.min()):,}-{int(np.median(files)):,}-{int(files.max()):,} samples  "
          f"worker holds {worker:,}  (laid out in {took:.1f} s)")


def overlap_row(name: str, n: int, ks: tuple, world: int, batch: int, split: bool) -> None:
    g = world * batch
    group, parent = labels(n, ks, g, split, seed=1)
    layout = lay_out(group, parent, world, batch, CHUNK_STEPS, 40, seed=0)
    anchors = np.random.default_rng(2).choice(n, 300, replace=False)
    streamed = negative_overlap(epoch_steps(layout, 0, 0, 4), epoch_steps(layout, 1, 0, 4), anchors)
    plans = [[(0, s.reshape(world, batch)) for s in plan_epoch(group, parent, g, 0, e).steps] for e in (0, 1)]
    reshuffled = negative_overlap(*plans, anchors)
    print(f"  {name:<26} negatives met again next epoch: streamed {100 * streamed:.1f}%, whole-group "
          f"reshuffle {100 * reshuffled:.1f}% ({streamed / max(reshuffled, 1e-9):.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=12_000_000)
    ap.add_argument("--shard-samples", type=int, default=10_000)
    args = ap.parse_args()
    cases = (("split, stage 3", (10, 10, 10), True), ("stage 1 (K = 10)", (10,), False),
             ("flat K = 10, stage 3", (10, 10, 10), False))
    for world, batch in ((64, 256), (8, 1000)):
        print(f"N = {args.samples:,}, W = {world} x B = {batch} (G = {world * batch:,}), chunks of "
              f"{CHUNK_STEPS} steps, files of about {args.shard_samples:,} samples per rank")
        for name, ks, split in cases:
            scale_row(name, args.samples, ks, world, batch, split, args.shard_samples)
    n, world, batch = args.samples // 60, 8, 1000 // 30  # same global batches per group, 60x fewer samples
    print(f"epoch to epoch, N = {n:,}, W = {world} x B = {batch}")
    for name, ks, split in cases:
        overlap_row(name, n, ks, world, batch, split)


if __name__ == "__main__":
    main()
