"""The streamed layout's promises, on labels alone: every sample once per epoch, every pure
step one group on all ranks, the global plan's pure share, bounded parts, steps that change
from epoch to epoch as much as a reshuffled group's for groups of a few global batches."""
from __future__ import annotations

import numpy as np

from pipeline.loader.global_batches import plan_epoch
from pipeline.loader.group_layout import MIXED, epoch_steps, lay_out, negative_overlap

W, B = 8, 16
G = W * B


def _groups(sizes):
    group = np.repeat(np.arange(len(sizes)), sizes)
    parent = group // 4
    return group, parent


def test_every_sample_once_a_step_one_group_on_all_ranks_and_the_global_plans_pure_share():
    rng = np.random.default_rng(0)
    sizes = [int(x) for x in rng.integers(G, 9 * G, size=12)]
    group, parent = _groups(sizes)
    layout = lay_out(group, parent, W, B, chunk_steps=4, bundle_steps=10, seed=3)
    plan = plan_epoch(group, parent, G, seed=3, epoch=0)
    assert layout.stats["pure_steps"] == plan.stats.pure_steps and layout.pure_samples == plan.stats.pure_samples
    assert layout.stats["steps"] == plan.stats.steps
    files = {(b, r): layout.file(b, r) for b in range(len(layout.bundles)) for r in range(W)}
    stored = np.concatenate(list(files.values()))
    assert sorted(stored.tolist()) == list(range(len(group)))  # every sample in exactly one file
    parts = layout.part_sizes()
    assert parts.tolist() == [[len(layout.part(c, r)) for r in range(W)] for c in range(len(layout.chunks))]
    assert parts.max() <= 4 * B  # what a worker holds at a time
    assert layout.file_sizes().tolist() == [[len(files[(b, r)]) for r in range(W)] for b in range(len(layout.bundles))]
    for epoch in (0, 1):
        steps = epoch_steps(layout, epoch, seed=3, workers=3)
        assert len(steps) == plan.stats.steps
        seen = np.concatenate([ids.reshape(-1) for _, ids in steps])
        seen = seen[seen >= 0]
        assert len(seen) == len(group) and len(np.unique(seen)) == len(group)
        for chunk, ids in steps:
            if layout.chunks[chunk].group != MIXED:
                assert (ids >= 0).all() and len(np.unique(group[ids])) == 1  # W x B - 1 negatives of its group
            for r in range(W):  # rank r's batch comes from rank r's file of the chunk's bundle
                row = ids[r][ids[r] >= 0]
                owner = next(b for b, members in enumerate(layout.bundles) if chunk in members)
                assert np.isin(row, files[(owner, r)]).all()


def test_batches_change_between_epochs_as_a_reshuffled_group_s_do_for_groups_of_a_few_batches():
    rng = np.random.default_rng(1)
    sizes = [4 * G + int(rng.integers(0, G)) for _ in range(24)]  # what the split clustering makes
    group, parent = _groups(sizes)
    layout = lay_out(group, parent, W, B, chunk_steps=4, bundle_steps=12, seed=0)
    anchors = rng.choice(len(group), 400, replace=False)
    streamed = negative_overlap(epoch_steps(layout, 0, 0, 2), epoch_steps(layout, 1, 0, 2), anchors)
    reshuffled = negative_overlap(*[[(0, s.reshape(W, B)) for s in plan_epoch(group, parent, G, 0, e).steps]
                                    for e in (0, 1)], anchors)
    assert 0 < streamed < 2 * reshuffled, (streamed, reshuffled)
    assert epoch_steps(layout, 0, 0, 2)[0][1].tolist() != epoch_steps(layout, 1, 0, 2)[0][1].tolist()
    # the same epoch twice is the same steps (resume, every rank alike)
    again = epoch_steps(layout, 1, 0, 2)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(again, epoch_steps(layout, 1, 0, 2)))


def test_a_resumed_epoch_goes_on_in_the_uninterrupted_order_when_streams_end_unevenly():
    from pipeline.loader.group_layout import epoch_bundles, merged_order, stream_roles

    dealt = epoch_bundles([7, 3, 9, 4, 4, 8, 2], epoch=0, seed=1, workers=3)
    assert sorted(b for d in dealt for b in d) == list(range(7))
    lengths = [sum([7, 3, 9, 4, 4, 8, 2][b] for b in d) for d in dealt]
    assert max(lengths) - min(lengths) <= 9
    order = merged_order(lengths)
    for consumed in range(len(order) + 1):
        done = {w: order[:consumed].count(w) for w in range(3)}
        roles = stream_roles(lengths, done)
        assert sorted(roles) == [0, 1, 2]
        left = {w: lengths[w] - done[w] for w in range(3)}
        # the DataLoader's rotation over its processes, each playing roles[p] from where it stopped
        resumed = merged_order([left[roles[p]] for p in range(3)])
        assert [roles[p] for p in resumed] == order[consumed:], consumed


def test_what_a_worker_holds_does_not_grow_with_the_groups_or_the_data():
    held = {}
    for groups in (2_000, 20_000):
        sizes = [2 * G + 5] * groups  # two pure steps and a remainder each
        group, parent = _groups(sizes)
        layout = lay_out(group, parent, W, B, chunk_steps=4, bundle_steps=40, seed=0)
        held[groups] = int(layout.part_sizes().max())
        assert layout.stats["pure_steps"] == 2 * groups
    assert held[2_000] == held[20_000] <= 4 * B
