"""Pseudo-label groups against the global batch: how much of a stage stays MCL.

At stage s the label is the combination of every earlier stage's cluster. A group smaller
than one global batch G (times `fallback_min_batches`) cannot fill a step of its own: its
samples fall back to the parent label (pipeline.loader.groups), i.e. that part of the stage
trains as the stage before. A group's samples beyond whole global batches go to masked
mixed steps. Three shares of the samples say how MCL a stage is:

    pure       in steps of one group (every anchor keeps all G - 1 negatives)
    mixed      in groups' leftovers, laid out together (cross-group pairs masked)
    fallback   relabelled to an ancestor (their own group was too small)

`shares` measures them from real group sizes (pipeline.reduce, the loaders); `forecast`
predicts them before any clustering from N, the K of each stage and G, on simulated sizes:
each group splits into its children with Dirichlet(alpha) proportions (alpha = 1 and 2
bracket what the loader benchmark and k-means on the demo worlds show; the forecast keeps
the worse). `split_sizes` is the split clustering's plan (pipeline.cluster, mode split): a
parent group of n samples gets k = min(K, n // (target x G)) children (at least one) whose
sizes are whole numbers of global batches plus an even share of the parent's remainder, so
a parent leaves at most one remainder to the mixed steps and no child falls back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.loader.groups import coarsen_labels

FORECAST_ALPHAS = (1.0, 2.0)
SAMPLE_FRACTION = 0.1  # of each parent group, in the split clustering's sample (pipeline.cluster)


@dataclass(frozen=True)
class Shares:
    samples: int
    groups: int
    pure: float
    mixed: float
    fallback: float

    def line(self) -> str:
        return (f"{self.groups} groups: {100 * self.pure:.1f}% of samples in pure steps, {100 * self.mixed:.1f}% "
                f"mixed, {100 * self.fallback:.1f}% fall back to a coarser label")

    def to_json(self) -> dict:
        return {"samples": self.samples, "groups": self.groups, "pure": round(self.pure, 4),
                "mixed": round(self.mixed, 4), "fallback": round(self.fallback, 4)}


def shares(sizes: dict[int, int], ks: Sequence[int], global_batch: int, min_size: float | None = None) -> Shares:
    """The pure / mixed / fallback shares of groups of `sizes` ({packed label: samples}) in
    global batches of `global_batch`; groups below `min_size` (default: one global batch)
    fall back level by level, as the loaders do."""
    min_size = global_batch if min_size is None else min_size
    total = sum(sizes.values())
    if not total:
        return Shares(0, 0, 0.0, 0.0, 0.0)
    mapping = coarsen_labels(sizes, tuple(ks), min_size)
    top = len(ks)
    coarse: dict = {}
    fell = 0
    for label, n in sizes.items():
        coarse[mapping[label]] = coarse.get(mapping[label], 0) + n
        fell += n if mapping[label][0] < top else 0
    pure = sum(n // global_batch * global_batch for n in coarse.values())
    return Shares(total, len(sizes), pure / total, (total - pure) / total, fell / total)


def split_sizes(n: int, k: int, global_batch: int, target_batches: float) -> list[int]:
    """The split clustering's children of a parent group of `n` samples: at most `k`, each
    about `target_batches` global batches, sizes whole global batches plus an even share of
    the remainder (a parent below one global batch keeps one child: it falls back anyway)."""
    whole = n // global_batch
    children = int(min(k, max(1, whole // max(target_batches, 1e-9))))
    if whole < children:
        children = max(1, whole)
    base, extra = divmod(whole, children)
    batches = [base + (1 if j < extra else 0) for j in range(children)]
    rest = n - whole * global_batch
    out = [b * global_batch + rest // children + (1 if j < rest % children else 0) for j, b in enumerate(batches)]
    return out


def simulate_sizes(n: int, ks: Sequence[int], alpha: float, seed: int = 0, global_batch: int | None = None,
                   target_batches: float | None = None, sample_fraction: float = SAMPLE_FRACTION) -> dict[int, int]:
    """{packed label: size} of N samples after stages of `ks`: each group splits into its
    children with Dirichlet(alpha) proportions; with `target_batches`, a split clustering's
    stages: children planned by `split_sizes`, received with the error of proportions fitted
    on a `sample_fraction` of the group (a balanced assignment fitted on a sample is close
    to its plan, not exact)."""
    rng = np.random.default_rng(seed)
    groups = {0: int(n)}
    for k in ks:
        new: dict[int, int] = {}
        for label, m in groups.items():
            if target_batches is None:
                counts = rng.multinomial(m, rng.dirichlet([alpha] * k))
            else:
                plan = np.array(split_sizes(m, k, global_batch, target_batches), dtype=float)
                fitted = rng.dirichlet(plan / m * max(m * sample_fraction, 1.0)) if len(plan) > 1 else np.ones(1)
                counts = rng.multinomial(m, fitted)
            for j, c in enumerate(counts.tolist()):
                if c:
                    new[label * k + j] = c
        groups = new
    return groups


def forecast(n: int, ks: Sequence[int], global_batch: int, min_size: float | None = None,
             target_batches: float | None = None, seed: int = 0, sample_fraction: float = SAMPLE_FRACTION) -> Shares:
    """The shares a stage trained on labels of `ks` can expect (the worse of the simulated
    alphas by fallback): flat k-means, or with `target_batches` the split clustering."""
    if not ks:
        return Shares(n, 1, (n // global_batch * global_batch) / max(n, 1), 0.0, 0.0)
    runs = [shares(simulate_sizes(n, ks, a, seed, global_batch, target_batches, sample_fraction), ks, global_batch,
                   min_size) for a in FORECAST_ALPHAS]
    return max(runs, key=lambda s: (s.fallback, -s.pure))


def fallback_refusal(what: str, found: Shares, global_batch: int, limit: float, forecast: bool = False) -> str:
    """The one line that refuses labels too fine for the batch, naming the knobs."""
    return (f"{what}: {100 * found.fallback:.1f}% of samples {'would ' if forecast else ''}fall back to a coarser "
            f"label at global batch {global_batch} ({found.groups} groups; train.max_fallback is "
            f"{100 * limit:g}%); cluster.mode: split sizes the groups for the batch (or use fewer clusters, a "
            f"smaller batch, or a higher train.max_fallback)")
