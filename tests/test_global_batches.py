"""The global same-group plan (pipeline.loader.global_batches): every rank's batch of a step from
one group, every sample once, nothing dropped, the same plan on every rank."""
from __future__ import annotations

import numpy as np

from pipeline.loader.global_batches import PAD, plan_epoch, steps_per_epoch
from pipeline.loader.groups import coarse_groups

KS = (3, 4)  # stage 3 of K = 3 then 4: packed labels c1 * 4 + c2, 12 groups


def _uneven_world(seed=0) -> np.ndarray:
    """Packed labels of 12 groups from 3 to 700 samples (some below one global batch)."""
    sizes = [700, 300, 130, 64, 40, 33, 20, 9, 5, 3, 250, 97]
    labels = np.concatenate([np.full(n, g, dtype=np.int64) for g, n in enumerate(sizes)])
    return np.random.default_rng(seed).permutation(labels)


def _dataloader_order(rank_steps: np.ndarray, workers: int) -> list[np.ndarray]:
    """What a rank's DataLoader yields: worker w makes steps w, w + workers, ... and the
    loader takes one batch from each worker in turn."""
    per_worker = [list(rank_steps[w::workers]) for w in range(workers)]
    out = []
    for i in range(max(map(len, per_worker))):
        out += [w[i] for w in per_worker if i < len(w)]
    return out


def test_four_ranks_of_two_workers_draw_each_step_from_one_group():
    packed = _uneven_world()
    world, batch, workers = 4, 8, 2
    g = world * batch
    group, parent, fell = coarse_groups(packed, KS, g)
    plan = plan_epoch(group, parent, g, seed=3, epoch=0, fell_back=fell)
    ranks = [_dataloader_order(plan.for_rank(r, batch), workers) for r in range(world)]
    assert len({len(r) for r in ranks}) == 1  # the same number of steps on every rank (DDP)
    seen, mixed = [], 0
    for step, pure in enumerate(plan.pure):
        gathered = np.concatenate([ranks[r][step] for r in range(world)])
        real = gathered[gathered != PAD]
        seen += real.tolist()
        if pure:
            assert len(real) == g and len(set(group[real].tolist())) == 1, step
        else:
            mixed += 1
    assert mixed == plan.stats.mixed_steps and 0 < mixed < len(plan.pure)
    assert sorted(seen) == list(range(len(packed)))  # every sample exactly once, none dropped
    assert plan.stats.dropped_samples == 0 and plan.stats.samples == len(packed)
    # groups below one global batch fell back to their parent, and were counted
    sizes = np.bincount(packed)
    assert plan.stats.fallback_samples == int(sizes[sizes < g].sum()) == int(fell.sum())
    assert not fell[packed == 0].any() and fell[packed == 9].all()
    # pure steps hold every whole global batch a group has: only remainders are mixed
    _, counts = np.unique(group, return_counts=True)
    assert plan.stats.pure_steps == int((counts // g).sum())
    assert len(plan.pure) == steps_per_epoch(len(packed), counts, g)


def test_the_plan_is_a_function_of_seed_and_epoch():
    packed = _uneven_world()
    group, parent, _ = coarse_groups(packed, KS, 32)
    a = plan_epoch(group, parent, 32, seed=1, epoch=4)
    b = plan_epoch(group, parent, 32, seed=1, epoch=4)  # another rank, or the run resumed
    assert np.array_equal(a.steps, b.steps) and np.array_equal(a.pure, b.pure)
    c = plan_epoch(group, parent, 32, seed=1, epoch=5)
    assert not np.array_equal(a.steps, c.steps)
    assert sorted(c.steps[c.steps != PAD].tolist()) == list(range(len(packed)))


def test_leftovers_stay_with_their_parent_in_mixed_steps():
    """Mixed steps hold groups' leftovers laid out by parent: a mixed step spans few parents."""
    packed = _uneven_world()
    group, parent, _ = coarse_groups(packed, KS, 32)
    plan = plan_epoch(group, parent, 32, seed=0, epoch=0)
    mixed = plan.steps[~plan.pure]
    for p in np.unique(parent):
        holding = [s for s in mixed if (parent[s[s != PAD]] == p).any()]
        leftovers = sum(int((parent[s[s != PAD]] == p).sum()) for s in holding)
        assert len(holding) <= leftovers // 32 + 2, (p, len(holding), leftovers)  # contiguous, not strewn
