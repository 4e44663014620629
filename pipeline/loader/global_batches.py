"""Global same-group batches: one epoch's plan, computed identically by every rank.

At stage s an anchor's negatives must come from its own pseudo-label group. When each
(rank x worker) slot buckets its own stream (pipeline.loader.slot), one rank's batch is one
group but the batch gathered across W ranks mixes W groups, and an anchor keeps about
B + (W-1)*B/L of its W*B - 1 negatives. Here the unit is the global batch: every step
draws all W*B samples from one group, so on a pure step every anchor keeps all W*B - 1.

The plan is a pure function of (the samples' labels, W*B, seed, epoch): every rank
computes the same plan without talking to the others, takes its B columns of each step,
and its DataLoader workers take every workers-th step (the DataLoader's round-robin gives
the steps back in order). Like the reference sampler (`MCL_batch_sampler_DDP` of the
official code) it needs random access to the samples; unlike it, nothing is dropped:

1. Groups smaller than one global batch (times `min_batches`) fall back to their parent
   label, level by level (pipeline.loader.groups), counted as `fallback_samples`.
2. Each group's samples are shuffled (per epoch) and cut into global batches: *pure* steps.
3. What is left of every group (less than a global batch each) is laid out by parent, then
   label, and cut into *mixed* steps; the loss masks cross-label pairs in them. The last
   one is padded (-1) where the samples do not fill it: a *short* step.
4. The steps are shuffled (per epoch). Every rank makes the same number of steps; a rank
   whose share of a short step is empty gets a batch of padding.

Memory: the plan holds one int64 per sample in the planning process (8 bytes x N: 80 MB
at 10 M samples), and a rank keeps its N/W; a worker holds one batch of samples at a time,
whatever the data set size and the number of groups.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np


PAD = -1


@dataclass
class PlanStats:
    steps: int = 0
    pure_steps: int = 0          # one group filled the whole global batch
    mixed_steps: int = 0         # groups' leftovers together (cross-label pairs masked)
    short_steps: int = 0         # the last mixed step, not full
    samples: int = 0
    pure_samples: int = 0        # samples in pure steps
    fallback_samples: int = 0    # relabelled to a parent group (theirs was below one global batch)
    dropped_samples: int = 0     # always 0 here (the reference drops every group's remainder)


@dataclass(frozen=True)
class EpochPlan:
    steps: np.ndarray            # int64 [S, W*B]: sample indices, PAD where a short step ends
    pure: np.ndarray             # bool [S]
    stats: PlanStats

    def for_rank(self, rank: int, batch_size: int) -> np.ndarray:
        """This rank's share: int64 [S, B], its B columns of every step."""
        return self.steps[:, rank * batch_size:(rank + 1) * batch_size]


def _rng(seed: int, epoch: int) -> np.random.Generator:
    digest = hashlib.blake2b(f"global-batches:{seed}:{epoch}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def plan_epoch(group: np.ndarray, parent: np.ndarray, global_batch: int, seed: int, epoch: int,
               fell_back: np.ndarray | None = None) -> EpochPlan:
    """The epoch's global steps over samples 0..N-1 of groups `group` (parents `parent`)."""
    n, g = len(group), global_batch
    rng = _rng(seed, epoch)
    order = np.lexsort((rng.random(n), group))              # grouped, shuffled inside each group
    sorted_groups = group[order]
    _, starts, counts = np.unique(sorted_groups, return_index=True, return_counts=True)
    full = counts // g * g                                  # each group's samples in whole global batches
    position = np.arange(n) - np.repeat(starts, counts)     # rank of each sample inside its group
    in_pure = position < np.repeat(full, counts)
    pure = order[in_pure].reshape(-1, g)
    rest = order[~in_pure]
    rest = rest[np.argsort(parent[rest], kind="stable")]    # leftovers by parent, then group
    short = (-len(rest)) % g
    mixed = np.concatenate([rest, np.full(short, PAD, dtype=np.int64)]).reshape(-1, g)
    steps = np.concatenate([pure, mixed])
    is_pure = np.concatenate([np.ones(len(pure), bool), np.zeros(len(mixed), bool)])
    shuffle = rng.permutation(len(steps))
    stats = PlanStats(steps=len(steps), pure_steps=len(pure), mixed_steps=len(mixed), short_steps=int(short > 0),
                      samples=n, pure_samples=pure.size,
                      fallback_samples=int(fell_back.sum()) if fell_back is not None else 0)
    return EpochPlan(steps[shuffle], is_pure[shuffle], stats)


def steps_per_epoch(num_samples: int, group_sizes: Sequence[int], global_batch: int) -> int:
    """The plan's number of steps, from the (coarse) group sizes alone."""
    sizes = np.asarray(group_sizes, dtype=np.int64)
    pure = int((sizes // global_batch).sum())
    rest = int(num_samples - pure * global_batch)
    return pure + -(-rest // global_batch)
