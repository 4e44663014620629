"""Groups sized for the batch: the measured and forecast shares, and the split clustering."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import split_clusters
from pipeline.group_sizing import forecast, shares, simulate_sizes, split_sizes
from pipeline.loader.global_batches import plan_epoch
from pipeline.loader.groups import coarse_groups


def test_the_shares_are_those_of_the_loaders_epoch_plan():
    rng = np.random.default_rng(0)
    ks = (5, 6)
    sizes = simulate_sizes(20_000, ks, alpha=1.0, seed=3)
    packed = np.repeat(np.array(list(sizes), np.int64), list(sizes.values()))
    rng.shuffle(packed)
    g = 256
    group, parent, fell = coarse_groups(packed, ks, g)
    stats = plan_epoch(group, parent, g, seed=0, epoch=0, fell_back=fell).stats
    found = shares(sizes, ks, g)
    assert found.samples == len(packed) == stats.samples
    assert found.pure == pytest.approx(stats.pure_samples / stats.samples)
    assert found.fallback == pytest.approx(stats.fallback_samples / stats.samples) and 0 < found.fallback < 1
    assert found.mixed == pytest.approx(1 - found.pure)


@pytest.mark.parametrize("n,k,g,target", [(100_000, 10, 1000, 4), (5_000, 10, 1000, 2), (999, 10, 1000, 4),
                                          (1_234_567, 10, 16_384, 4), (40_000, 3, 1000, 1)])
def test_a_split_plan_is_whole_global_batches_and_a_share_of_the_rest(n, k, g, target):
    plan = split_sizes(n, k, g, target)
    assert sum(plan) == n and 1 <= len(plan) <= k
    if n >= g:
        assert min(plan) >= g  # no child falls back
        rest = n - n // g * g
        assert sum(s % g for s in plan) == rest  # the parent's remainder alone goes to mixed steps
        assert max(plan) - min(plan) <= g + 1
        assert len(plan) == min(k, max(1, n // g // target))


def test_the_split_clustering_gives_every_parent_its_planned_children():
    rng = np.random.default_rng(0)
    n, d, g = 12_000, 8, 256
    x = rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    parents = rng.choice([3, 7, 11], size=n, p=[0.5, 0.3, 0.2]).astype(np.int64)
    sizes = {int(p): int((parents == p).sum()) for p in (3, 7, 11)}
    centroids, parent, child, bias, planned = split_clusters.fit(x, parents, sizes, 4, g, 2.0, 10, 0, True, False)
    assert sorted(set(parent.tolist())) == [3, 7, 11] and len(centroids) == len(planned)
    got = split_clusters.assign(x, parents, centroids, parent, child, bias)
    for p in (3, 7, 11):
        counts = np.bincount(got[parents == p], minlength=int((parent == p).sum()))
        want = np.array([s for s, q in zip(planned, parent.tolist()) if q == p])
        assert len(counts) == len(want) == len(split_sizes(sizes[p], 4, g, 2.0))
        assert np.abs(counts - want).max() <= 1  # fitted on all the points: the plan, exactly
        assert counts.min() >= g
    # a point is only ever given a child of its own parent: its parent's rows alone compete
    rows = {p: np.nonzero(parent == p)[0] for p in (3, 7, 11)}
    for i in range(0, n, 997):
        s = split_clusters.scores(x[i:i + 1], centroids, bias)[0]
        own = rows[int(parents[i])]
        assert got[i] == child[own[np.argmax(s[own])]]


def test_at_cc12m_scale_split_groups_keep_stage_3_mcl_where_flat_k_falls_back():
    n, ks = 12_000_000, (10, 10, 10)
    for g in (64 * 256, 8 * 1000):
        flat = forecast(n, ks, g)
        split = forecast(n, ks, g, target_batches=4)
        assert flat.fallback > 0.10 and flat.pure < 0.9
        assert split.fallback <= 0.05 and split.pure >= 0.9
