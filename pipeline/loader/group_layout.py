"""A stage's samples laid out by pseudo-label group for streaming, and how an epoch reads them.

`bucket=global` (pipeline.loader.global_batches) reads every sample at its byte offset: one
seek and one read per sample, which only fast POSIX storage serves. This module is the plan
of the streamed alternative: a regroup writes the samples once per stage into files that a
rank reads whole and in order, from any URL, and every global step is still one group on
all ranks.

The layout (computed once, from the coarse groups: groups below one global batch G = W x B
have fallen back to their parent, as in the global plan, so it depends on W x B):

1. Each group's samples are shuffled and cut into whole global batches (its *pure* steps);
   what is left of every group is laid out by parent, then group, and cut into *mixed*
   steps (the loss masks cross-group pairs), the last one short: the global plan's policy.
2. The steps are cut into *chunks* of at most `chunk_steps` steps of one group (or of the
   mixed stream). Rank r's *part* of a chunk is its B columns of each of the chunk's steps.
3. The chunks, in a seeded random order, are packed into *bundles* of about `bundle_steps`
   steps. Bundle b is written as one file per rank: rank r's parts of the bundle's chunks,
   in order. A rank reads only its own files, each once per epoch, sequentially.

An epoch (the same on every rank, from the seed and the epoch alone): the bundles in a
permuted order, dealt to the DataLoader workers round-robin; a worker reads its bundles'
files in turn and, for each chunk, shuffles the rank's part in memory before cutting it into
the chunk's batches. The steps of a chunk are therefore one group on every rank, and which
samples share a step changes from epoch to epoch. A worker holds one chunk's part at a time
(chunk_steps x B samples): memory bounded by the config, not by the data set or the groups.
With the split clustering (groups of a few global batches) a chunk is a whole group and the
per-epoch shuffle of each part mixes a group as fully as reshuffling it; a group much larger
than a chunk keeps its chunks' samples together across epochs (`negative_overlap` measures
it: bench/group_layout.py; chunks of 8 steps hold a split group whole).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

MIXED = -1


def _rng(*parts) -> np.random.Generator:
    digest = hashlib.blake2b(":".join(map(str, ("group-layout", *parts))).encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


@dataclass(frozen=True)
class Chunk:
    group: int       # the coarse group of its steps; MIXED for leftovers of several groups
    steps: int       # global steps
    first: int       # its first sample's position in `Layout.order`
    samples: int     # samples in it (steps x G, less for the short last mixed step)


@dataclass
class Layout:
    world: int
    batch: int
    order: np.ndarray                 # int64 [N]: sample indices, chunk after chunk
    chunks: list[Chunk]
    bundles: list[list[int]]          # chunk indices of each bundle, in file order
    pure_samples: int = 0
    stats: dict = field(default_factory=dict)

    @property
    def global_batch(self) -> int:
        return self.world * self.batch

    def part(self, chunk: int, rank: int) -> np.ndarray:
        """The sample indices of `rank`'s part of a chunk, in file order (its B columns of
        each step; the short last step leaves later ranks fewer, or none)."""
        c = self.chunks[chunk]
        ids = self.order[c.first:c.first + c.samples]
        padded = np.full(c.steps * self.global_batch, -1, np.int64)
        padded[:len(ids)] = ids
        cols = padded.reshape(c.steps, self.world, self.batch)[:, rank, :].reshape(-1)
        return cols[cols >= 0]

    def file(self, bundle: int, rank: int) -> np.ndarray:
        """The sample indices of rank `rank`'s file of bundle `bundle`, in order."""
        return np.concatenate([self.part(c, rank) for c in self.bundles[bundle]] or [np.zeros(0, np.int64)])

    def part_sizes(self) -> np.ndarray:
        """int64 [chunks, W]: the samples of each rank's part of each chunk (B per step; the
        short last step fills the ranks' columns in order)."""
        steps = np.array([c.steps for c in self.chunks], np.int64)
        samples = np.array([c.samples for c in self.chunks], np.int64)
        last = samples - (steps - 1) * self.global_batch                      # in the chunk's last step
        ranks = np.arange(self.world, dtype=np.int64)
        return (steps[:, None] - 1) * self.batch + np.clip(last[:, None] - ranks * self.batch, 0, self.batch)

    def file_sizes(self) -> np.ndarray:
        """int64 [bundles, W]: the samples of each rank's file of each bundle."""
        parts = self.part_sizes()
        return np.stack([parts[members].sum(0) for members in self.bundles]) if self.bundles else parts[:0]

    def bundle_steps(self) -> list[int]:
        """The global steps of each bundle."""
        return [sum(self.chunks[c].steps for c in members) for members in self.bundles]


def lay_out(group: np.ndarray, parent: np.ndarray, world: int, batch: int, chunk_steps: int,
            bundle_steps: int, seed: int) -> Layout:
    """The layout of samples 0..N-1 of coarse groups `group` (parents `parent`)."""
    g = world * batch
    n = len(group)
    rng = _rng(seed, "layout")
    order = np.lexsort((rng.random(n), group))
    _, starts, counts = np.unique(group[order], return_index=True, return_counts=True)
    full = counts // g * g
    position = np.arange(n) - np.repeat(starts, counts)
    in_pure = position < np.repeat(full, counts)
    pure, rest = order[in_pure], order[~in_pure]
    rest = rest[np.argsort(parent[rest], kind="stable")]   # leftovers by parent, then group
    chunks: list[Chunk] = []
    first = 0
    for label, steps in zip(group[order][starts].tolist(), (counts // g).tolist()):
        for begin in range(0, steps, chunk_steps):
            k = min(chunk_steps, steps - begin)
            chunks.append(Chunk(int(label), k, first, k * g))
            first += k * g
    mixed_steps = -(-len(rest) // g)
    for begin in range(0, mixed_steps, chunk_steps):
        k = min(chunk_steps, mixed_steps - begin)
        samples = min(k * g, len(rest) - begin * g)
        chunks.append(Chunk(MIXED, k, first, samples))
        first += samples
    bundles: list[list[int]] = []
    current, filled = [], 0
    for c in rng.permutation(len(chunks)).tolist():
        current.append(c)
        filled += chunks[c].steps
        if filled >= bundle_steps:
            bundles.append(current)
            current, filled = [], 0
    if current:
        bundles.append(current)
    layout = Layout(world, batch, np.concatenate([pure, rest]), chunks, bundles, pure_samples=len(pure))
    layout.stats = {"samples": n, "steps": sum(c.steps for c in chunks), "pure_steps": len(pure) // g,
                    "mixed_steps": mixed_steps, "pure_samples": len(pure), "chunks": len(chunks),
                    "bundles": len(bundles), "files": len(bundles) * world}
    return layout


def epoch_bundles(bundle_steps: Sequence[int], epoch: int, seed: int, workers: int) -> list[list[int]]:
    """The bundles each DataLoader worker (stream) reads this epoch, in order, the same on
    every rank: the bundles in the epoch's order, each to the stream with the fewest steps
    so far (the streams end within about one bundle of each other)."""
    workers = max(1, workers)
    dealt: list[list[int]] = [[] for _ in range(workers)]
    load = [0] * workers
    for b in _rng(seed, "epoch", epoch).permutation(len(bundle_steps)).tolist():
        w = min(range(workers), key=lambda i: (load[i], i))
        dealt[w].append(b)
        load[w] += int(bundle_steps[b])
    return dealt


def merged_order(lengths: Sequence[int]) -> list[int]:
    """The stream of each batch in the order a DataLoader yields them: round-robin over its
    workers, a worker whose stream has ended leaving the rotation."""
    out, made = [], [0] * len(lengths)
    while len(out) < sum(lengths):
        for w, n in enumerate(lengths):
            if made[w] < n:
                out.append(w)
                made[w] += 1
    return out


def stream_roles(lengths: Sequence[int], done: dict[int, int]) -> list[int]:
    """The stream each worker process plays in an epoch resumed after `done` ({stream:
    batches made}): the DataLoader asks its processes in turn, so the streams not ended
    go to the first processes in the rotation's order from the stream whose batch comes
    next, the ended ones to the rest (they stop at once). Without a resume: process w plays
    stream w."""
    consumed = sum(done.values())
    order = merged_order(lengths)
    if consumed >= len(order):
        return list(range(len(lengths)))
    nxt = order[consumed]
    live = [w for w in range(len(lengths)) if done.get(w, 0) < lengths[w]]
    start = live.index(nxt)
    live = live[start:] + live[:start]
    return live + [w for w in range(len(lengths)) if w not in live]


def chunk_batches(layout: Layout, chunk: int, rank: int, epoch: int, seed: int) -> np.ndarray:
    """int64 [steps, B]: `rank`'s batches of a chunk this epoch (its part shuffled in memory;
    -1 pads a short step)."""
    c = layout.chunks[chunk]
    part = layout.part(chunk, rank)
    part = part[_rng(seed, "chunk", epoch, chunk, rank).permutation(len(part))]
    out = np.full(c.steps * layout.batch, -1, np.int64)
    out[:len(part)] = part
    return out.reshape(c.steps, layout.batch)


def worker_steps(layout: Layout, bundles: list[int], rank: int, epoch: int, seed: int):
    """(chunk, [B] sample indices) of each step a worker makes from its bundles, in order."""
    for b in bundles:
        for c in layout.bundles[b]:
            for row in chunk_batches(layout, c, rank, epoch, seed):
                yield c, row


def epoch_steps(layout: Layout, epoch: int, seed: int, workers: int) -> list[tuple[int, np.ndarray]]:
    """The epoch's global steps in the order training meets them: (chunk, int64 [W, B]). The
    DataLoader's round-robin over workers (an ended stream leaves the rotation:
    `merged_order`) is the same on every rank, so step t is the same chunk on all of them."""
    dealt = epoch_bundles(layout.bundle_steps(), epoch, seed, workers)
    streams = [[list(worker_steps(layout, dealt[w], r, epoch, seed)) for w in range(len(dealt))]
               for r in range(layout.world)]
    steps, position = [], [0] * len(dealt)
    for w in merged_order([len(s) for s in streams[0]]):
        i = position[w]
        steps.append((streams[0][w][i][0], np.stack([streams[r][w][i][1] for r in range(layout.world)])))
        position[w] += 1
    return steps


def negative_overlap(steps_a, steps_b, anchors: np.ndarray) -> float:
    """The mean share of an anchor's negatives in the second epoch that it already met in the
    first (a negative: any other sample of its global step)."""
    def met(steps):
        where = {}
        for _, ids in steps:
            flat = ids.reshape(-1)
            flat = flat[flat >= 0]
            for a in np.intersect1d(flat, anchors, assume_unique=False).tolist():
                where[a] = flat[flat != a]
        return where
    first, second = met(steps_a), met(steps_b)
    shares = [np.isin(second[a], first[a]).mean() for a in anchors.tolist() if a in first and a in second
              and len(second[a])]
    return float(np.mean(shares)) if shares else 0.0
