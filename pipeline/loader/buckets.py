"""Cluster bucketing: turn a stream of labelled samples into same-label batch plans.

This is the batching policy of the cluster-bucketed slot loader (pipeline.loader.slot), kept free of
torch and I/O so it can be reasoned about and tested on its own. Samples arrive in the
(shuffled) stream order; each goes to the bucket of its pseudo-label; a bucket that
reaches the batch size is emitted as a *pure* batch. The policy for everything else:

1. Small groups fall back to their parent label. Before the epoch, `coarsen_labels`
   (pipeline.loader.groups)
   maps every pseudo-label (c_1, ..., c_s) whose group is too small to fill a batch in
   each stream slot (rank x worker) to its parent (c_1, ..., c_{s-1}), level by level,
   until the group is big enough or it reaches the root (one label for all). The samples
   so relabelled are counted as `fallback_samples`. Their negatives still share every
   cluster id but the last ones.
2. Memory is capped. When the buffered samples reach `cap`, the fullest bucket is
   emitted early, topped up to the batch size from the buckets of the same parent label
   first, then from the largest others: a *mixed* batch (counted). The loss masks
   cross-label pairs, so a mixed batch is still correct, it only has fewer negatives per
   anchor. The buffer never holds more than `cap` samples.
3. Nothing is dropped. When the stream ends, the leftovers are emitted as batches in
   label order (pure where a label still fills one, mixed otherwise); the last one may be
   short (the loader pads it with masked entries).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Hashable, Iterable, Iterator, Sequence


@dataclass
class BucketStats:
    pure_batches: int = 0
    mixed_batches: int = 0
    early_batches: int = 0       # emitted because the buffer reached its cap
    short_batches: int = 0       # the final, not full, batch of a stream
    samples: int = 0
    max_buffered: int = 0
    fallback_samples: int = 0    # relabelled to a parent label (their group was too small)
    missing_labels: int = 0      # had no sidecar entry (with the "own label" option)

    def as_list(self) -> list[int]:
        return [self.pure_batches, self.mixed_batches, self.early_batches, self.short_batches, self.samples,
                self.max_buffered, self.fallback_samples, self.missing_labels]

    @classmethod
    def from_list(cls, values: Sequence[int]) -> "BucketStats":
        return cls(*[int(v) for v in values])

    def count_step(self, samples: int, pure: bool, batch_size: int) -> None:
        """One batch of a global step: its planned samples, pure or mixed (short: not full)."""
        self.samples += samples
        if pure:
            self.pure_batches += 1
        else:
            self.mixed_batches += 1
            self.short_batches += int(samples < batch_size)

    def restart(self) -> None:
        """Count from zero on (the high-water mark `max_buffered` stays)."""
        for f in fields(self):
            if f.name != "max_buffered":
                setattr(self, f.name, 0)

    def merge(self, other: "BucketStats") -> "BucketStats":
        out = BucketStats(*[a + b for a, b in zip(self.as_list(), other.as_list())])
        out.max_buffered = max(self.max_buffered, other.max_buffered)
        return out


def plan_batches(stream: Iterable[tuple[Hashable, Hashable, object]], batch_size: int, cap: int,
                 stats: BucketStats | None = None) -> Iterator[list]:
    """Yield lists of samples. `stream` yields (label, parent_label, sample)."""
    if cap < batch_size:
        raise ValueError(f"bucket cap {cap} must be >= batch size {batch_size}")
    stats = stats if stats is not None else BucketStats()
    buckets: dict[Hashable, list] = {}
    parent_of: dict[Hashable, Hashable] = {}
    buffered = 0

    def emit(batch: list) -> list:
        labels = {label for label, _ in batch}
        if len(labels) == 1 and len(batch) == batch_size:
            stats.pure_batches += 1
        else:
            stats.mixed_batches += 1
        return [s for _, s in batch]

    for label, parent, sample in stream:
        stats.samples += 1
        parent_of[label] = parent
        bucket = buckets.setdefault(label, [])
        bucket.append((label, sample))
        buffered += 1
        if len(bucket) == batch_size:
            del buckets[label]
            buffered -= batch_size
            yield emit(bucket)
            continue
        stats.max_buffered = max(stats.max_buffered, buffered)
        if buffered >= cap:
            batch = _take_fullest(buckets, parent_of, batch_size)
            buffered -= len(batch)
            stats.early_batches += 1
            yield emit(batch)
    # leftovers, grouped by parent then label, so that batches stay as pure as they can
    rest = []
    for label in sorted(buckets, key=lambda lab: (repr(parent_of[lab]), -len(buckets[lab]), repr(lab))):
        rest.extend(buckets[label])
    for i in range(0, len(rest), batch_size):
        chunk = rest[i:i + batch_size]
        if len(chunk) < batch_size:
            stats.short_batches += 1
        yield emit(chunk)


def _take_fullest(buckets: dict, parent_of: dict, batch_size: int) -> list:
    fullest = max(buckets, key=lambda lab: (len(buckets[lab]), repr(lab)))
    batch = buckets.pop(fullest)
    order = sorted(buckets, key=lambda lab: (parent_of[lab] != parent_of[fullest], -len(buckets[lab]), repr(lab)))
    for label in order:
        need = batch_size - len(batch)
        if need == 0:
            break
        take = buckets[label][:need]
        batch.extend(take)
        if len(take) == len(buckets[label]):
            del buckets[label]
        else:
            buckets[label] = buckets[label][len(take):]
    return batch
