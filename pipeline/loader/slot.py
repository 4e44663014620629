"""The streamed loader (bucket=slot and plain batches): shards -> shuffled samples -> labelled batches.

Follows open_clip's webdataset pipeline (shards split over ranks and DataLoader workers,
a sample shuffle buffer of undecoded samples, decode + transform, fixed-size batches, an
epoch of `ceil(num_batches / workers)` batches per worker), with two additions:

- Labels: every sample carries an int64 pseudo-label (`labeler`) and an int64 caption id
  (a hash of its text), so the loss can mask cross-label pairs and duplicate captions.
- Exact resume: the stream of each (rank, worker) is a pure function of (seed, epoch,
  rank, worker); each batch carries the worker's position (raw samples consumed, batches
  made), and a stream restarted at a position skips that many undecoded samples. Image
  augmentation is seeded per sample, so skipping does not shift anyone's randomness.

A worker whose shards run out before its epoch's batches are made starts over on its
shards (reshuffled): ranks always make the same number of steps, as DDP needs.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
import random
from typing import Iterator, Sequence

import webdataset as wds
from torch.utils.data import IterableDataset

from pipeline.loader.batch import Batch, BatchInfo
from pipeline.loader.buckets import BucketStats, plan_batches
from pipeline.loader.decode import blank_image, decode_batch
from pipeline.loader.labels import Labeler, no_labels, seed_of, stable_hash64
from pipeline.loader.workers import stream_role
from shards.reader import ProblemLog, good_samples


def shards_for_slot(urls: Sequence[str], slot: int, slots: int, exclusive: bool = False,
                    sizes: Sequence[int] | None = None) -> list[str]:
    """Shards of one (rank, worker) slot. With the shards' sample counts (`sizes`), balanced
    by them: each shard, largest first, goes to the slot with the fewest samples so far
    (equal shards: every slots-th shard, as without sizes). With fewer shards than slots,
    slots share shards (each still gets one) unless `exclusive`, where every shard is read
    once and some slots get none."""
    if len(urls) < slots and not exclusive:
        return [urls[slot % len(urls)]]
    if sizes is None:
        return list(urls[slot::slots])
    load = [(0, s) for s in range(slots)]  # (samples so far, slot): a heap
    mine = []
    for i in sorted(range(len(urls)), key=lambda i: -sizes[i]):  # stable: equal shards keep their order
        total, owner = heapq.heappop(load)
        if owner == slot:
            mine.append(urls[i])
        heapq.heappush(load, (total + sizes[i], owner))
    return mine


class TrainStream(IterableDataset):
    """`Batch`es of `batch_size` entries for one rank (pipeline.loader.batch).

    Plain mode (`bucket_cap` None): each worker makes `worker_batches` batches of
    consecutive samples per epoch, starting over on its shards when they run out.
    Bucketed mode: each worker reads its shards once per epoch and batches them with
    pipeline.loader.buckets (same-label batches; every sample exactly once; a short batch is padded).
    Each batch's `info` is its worker's BatchInfo: the batches it has made, its problem
    counts and BucketStats so far this epoch (in a resumed epoch: since the resume point).
    Shards go to (rank, worker) slots balanced by their sample counts when `sizes` gives
    them (shards_for_slot), else striped.
    """

    def __init__(self, urls: Sequence[str], transform, tokenizer, batch_size: int, worker_batches: int | None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1000,
                 labeler: Labeler = no_labels, bucket_cap: int | None = None, sizes: Sequence[int] | None = None,
                 captions: bool = True):
        super().__init__()
        self.urls, self.transform, self.tokenizer, self.sizes = list(urls), transform, tokenizer, sizes
        self.batch_size, self.worker_batches, self.bucket_cap = batch_size, worker_batches, bucket_cap
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer, self.labeler = shuffle_buffer, labeler
        self.captions = captions  # False: image-only training, a sample needs no caption
        self.epoch = 0
        self.start: dict[int, int] = {}  # worker -> batches already consumed this epoch
        self.problems = ProblemLog()

    def set_epoch(self, epoch: int, start: dict[int, int] | None = None) -> None:
        self.epoch, self.start = epoch, dict(start or {})

    def _raw(self, worker: int, workers: int, forever: bool) -> Iterator[dict]:
        """Checked, labelled, shuffled, undecoded samples of this slot."""
        slot, slots = self.rank * workers + worker, self.world_size * workers
        shards = shards_for_slot(self.urls, slot, slots, exclusive=not forever, sizes=self.sizes)
        for rnd in range(1 << 62 if forever else 1):
            rng = random.Random(seed_of(self.seed, self.epoch, slot, rnd))
            order = shards[:]
            rng.shuffle(order)
            stream = wds.DataPipeline(lambda: iter(order), *good_samples(self.problems, captions=self.captions),
                                      lambda samples: self._labelled(samples, rnd),
                                      wds.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng))
            n = 0
            for s in stream:
                n += 1
                yield s
            if n == 0 and forever:
                raise RuntimeError(f"no usable samples in shards {order} ({self.problems.summary()})")

    def _labelled(self, samples, rnd: int):
        for s in samples:  # in shard order, before the shuffle: one sidecar read per shard
            labels = self.labeler(s)
            if labels is None:
                continue  # an earlier job could not use it (counted by the labeler)
            s["label"], s["parent"] = labels
            s["caption_id"] = stable_hash64(s["text"])
            s["round"] = rnd
            yield s

    def _plans(self, worker: int, workers: int, stats: BucketStats) -> Iterator[list]:
        if self.bucket_cap is None:
            raw = self._raw(worker, workers, forever=True)
            for _ in range(self.worker_batches):
                yield [next(raw) for _ in range(self.batch_size)]
        else:
            raw = self._raw(worker, workers, forever=False)
            yield from plan_batches(((s["label"], s["parent"], s) for s in raw), self.batch_size,
                                    self.bucket_cap, stats)

    def __iter__(self):
        worker, workers = stream_role(self.start)
        stats, self.problems = BucketStats(), ProblemLog()  # this epoch's (a worker process's own)
        self.labeler.stats, self.labeler.problems = stats, self.problems
        done = self.start.get(worker, 0)
        blank = blank_image(self.transform)
        for made, plan in enumerate(self._plans(worker, workers, stats), start=1):
            if made <= done:  # consumed before a resume: skipped without decoding
                # decoded before the resume: a corrupt image met again (plain mode's next round) counts once
                self.problems.known("corrupt_image", ((s["__url__"], s["__key__"]) for s in plan))
                if made == done:  # the counts so far are in the checkpoint (pipeline.loader.progress)
                    stats.restart()
                    self.problems.restart()
                continue
            info = BatchInfo(worker, made, self.problems.as_list(), dataclasses.replace(stats))
            yield decode_batch(plan, self.transform, self.tokenizer, self.batch_size, blank, self.seed, self.epoch,
                               self.problems, info)

    def padding(self) -> Batch:
        """A batch of padding alone, for a rank whose data ran out before the others'."""
        return Batch.padding(self.batch_size, blank_image(self.transform), self.tokenizer)


def epoch_plan(num_samples: int, batch_size: int, world_size: int, workers: int) -> tuple[int, int]:
    """(batches per worker, steps per epoch), rounded up as open_clip does."""
    num_batches = math.ceil(num_samples / (batch_size * world_size))
    worker_batches = math.ceil(num_batches / max(1, workers))
    return worker_batches, worker_batches * max(1, workers)
