"""Pseudo-label groups and their fallback: one id scheme for a coarse group, in every loader.

A group below a minimum size (one global batch, or a slot's share) falls back to its
parent label, level by level (`coarsen_labels`). A coarse group, a pseudo-label group or
the ancestor a small group falls back to, has one id: `coarse_id(level, value)`, the level
in the top 8 bits and the packed (c_1..c_level) value below (pipeline.assign packs them;
pipeline.stage keeps them below 2^56). Free of torch and I/O, like the planning it serves.
"""
from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

LEVEL_SHIFT = 56


def coarse_id(level: int, value: int) -> int:
    """The id of the group `value` (packed c_1..c_level) at `level` (0: the root)."""
    return (level << LEVEL_SHIFT) | value


def coarse_groups(packed: np.ndarray, ks: Sequence[int], min_size: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group id, parent group id, fell back) per sample, for packed pseudo-labels (c_1..c_s as
    one int, pipeline.assign) whose groups below `min_size` fall back to their parent."""
    values, inverse, counts = np.unique(packed, return_inverse=True, return_counts=True)
    table = label_table(dict(zip(values.tolist(), counts.tolist())), ks, min_size)
    rows = np.array([table[v] for v in values.tolist()], dtype=np.int64).reshape(-1, 3)
    return rows[inverse, 0], rows[inverse, 1], rows[inverse, 2].astype(bool)


def label_table(group_sizes: dict[int, int], ks: Sequence[int], min_size: float) -> dict:
    """packed pseudo-label -> (group id, parent group id, fell back), groups below `min_size`
    coarsened by `coarsen_labels`."""
    top = len(ks)
    table = {}
    for packed, (level, value) in coarsen_labels(group_sizes, ks, min_size).items():
        label = coarse_id(level, value)
        parent = coarse_id(level - 1, value // ks[level - 1]) if level > 0 else label
        table[packed] = (label, parent, level < top)
    return table


def coarsen_labels(group_sizes: dict[int, int], ks: Sequence[int], min_size: float) -> dict[int, tuple]:
    """Map each pseudo-label to (level, value): itself at level s = len(ks) when its group
    has at least `min_size` samples, else its nearest ancestor whose merged small
    descendants reach `min_size` (level 0 = the root, everything)."""
    level = len(ks)
    mapping = {lab: (level, lab) for lab in group_sizes}
    pending = {lab: n for lab, n in group_sizes.items() if n < min_size}
    members = {lab: [lab] for lab in pending}
    while pending and level > 0:
        k = ks[level - 1]
        level -= 1
        merged: dict[int, int] = collections.Counter()
        merged_members: dict[int, list] = collections.defaultdict(list)
        for lab, n in pending.items():
            merged[lab // k] += n
            merged_members[lab // k].extend(members[lab])
        pending, members = {}, {}
        for parent, n in merged.items():
            for original in merged_members[parent]:
                mapping[original] = (level, parent)
            if n < min_size:
                pending[parent], members[parent] = n, merged_members[parent]
    return mapping
