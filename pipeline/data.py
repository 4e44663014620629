"""The streaming training data: shards -> shuffled samples -> labelled, tokenised batches.

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
import functools
import hashlib
import heapq
import logging
import math
import random
import time
from typing import Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
import webdataset as wds

from pipeline.artifacts import read_sidecar, sidecar_skipped
from pipeline.stage import StageDir
from pipeline.batch import Batch, BatchInfo
from pipeline.buckets import BucketStats, coarsen_labels, plan_batches
from shards.reader import ProblemLog, decode_image, good_samples

log = logging.getLogger("pipeline.data")

def stable_hash64(text: str) -> int:
    """A signed int64 hash of a string, the same in every process and run."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


class Labeler:
    """sample -> (label, parent label), or None for a sample an earlier job could not use
    (skipped, counted in `problems`); `stats` is the worker's BucketStats to count into."""
    stats: BucketStats | None = None
    problems: ProblemLog | None = None

    def __call__(self, sample: dict) -> tuple[int, int] | None:
        raise NotImplementedError


class NoLabels(Labeler):
    def __call__(self, sample: dict) -> tuple[int, int]:
        return 0, 0


no_labels = NoLabels()


class JsonLabeler(Labeler):
    """Label = hash of a field of the sample's json (e.g. "attributes.shape"); for tests."""

    def __init__(self, path: str):
        self.path, self.keys = path, path.split(".")

    def __call__(self, sample: dict) -> tuple[int, int]:
        value = sample.get("json")
        for k in self.keys:
            if not isinstance(value, dict) or k not in value:
                raise KeyError(f"{sample['__url__']} key {sample['__key__']}: json has no field {self.path!r}")
            value = value[k]
        label = stable_hash64(repr(value))
        return label, label


MISSING_LABEL = stable_hash64("mcl:no-sidecar-entry")


class SidecarLabeler(Labeler):
    """Pseudo-labels of a stage's sidecars, joined by key; small groups coarsened.

    `table` maps each packed pseudo-label to (label for the loss, parent label for the
    bucketing, whether it fell back to an ancestor): see `sidecar_label_table`. A sample
    the embed job could not use (the sidecar's skip record: a corrupt image, ...) is skipped
    and counted under the same problem kind. A sample without an entry for no recorded
    reason is an error naming shard and key (a stale or foreign sidecar), or with
    `missing="own"` joins one label of its own and is counted.
    """

    def __init__(self, stage, expect, table: dict, missing: str = "error"):
        self.stage, self.expect, self.table, self.missing = StageDir(stage), expect, table, missing
        self._url, self._labels, self._skipped = None, {}, {}

    def __call__(self, sample: dict) -> tuple[int, int] | None:
        url = sample["__url__"]
        if url != self._url:
            path = self.stage.sidecar(url)
            self._url, self._labels, self._skipped = url, read_sidecar(path, self.expect), sidecar_skipped(path)
        packed = self._labels.get(sample["__key__"])
        if packed is None and sample["__key__"] in (self._skipped or {}):
            if self.problems is not None:
                self.problems.add(self._skipped[sample["__key__"]], url, sample["__key__"], "skipped by embed")
            return None
        if packed is None:
            if self.missing != "own":
                why = ("; the sidecar predates skip records: rerun the stage's embed and assign steps"
                       if self._skipped is None else "")
                raise KeyError(f"{self.stage.sidecar(url)}: no pseudo-label for key {sample['__key__']} "
                               f"of shard {url} (set missing_labels=own to give such samples a label of their own)"
                               + why)
            if self.stats is not None:
                self.stats.missing_labels += 1
            return MISSING_LABEL, MISSING_LABEL
        label, parent, fell_back = self.table[packed]
        if fell_back and self.stats is not None:
            self.stats.fallback_samples += 1
        return label, parent


def sidecar_label_table(group_sizes: dict[int, int], ks: Sequence[int], min_size: float) -> dict:
    """packed pseudo-label -> (loss label, parent label, fell back), groups coarsened by
    pipeline.buckets.coarsen_labels; labels of different levels never collide."""
    top = len(ks)
    table = {}
    for packed, (level, value) in coarsen_labels(group_sizes, ks, min_size).items():
        label = stable_hash64(f"{level}:{value}")
        parent = stable_hash64(f"{level - 1}:{value // ks[level - 1]}") if level > 0 else label
        table[packed] = (label, parent, level < top)
    return table


def _seed(*parts) -> int:
    return stable_hash64(":".join(map(str, parts))) & 0x7FFF_FFFF_FFFF_FFFF


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
    """`Batch`es of `batch_size` entries for one rank (pipeline.batch).

    Plain mode (`bucket_cap` None): each worker makes `worker_batches` batches of
    consecutive samples per epoch, starting over on its shards when they run out.
    Bucketed mode: each worker reads its shards once per epoch and batches them with
    pipeline.buckets (same-label batches; every sample exactly once; a short batch is padded).
    Each batch's `info` is its worker's BatchInfo: the batches it has made, its problem
    counts and BucketStats so far this epoch (in a resumed epoch: since the resume point).
    Shards go to (rank, worker) slots balanced by their sample counts when `sizes` gives
    them (shards_for_slot), else striped.
    """

    def __init__(self, urls: Sequence[str], transform, tokenizer, batch_size: int, worker_batches: int | None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1000,
                 labeler: Labeler = no_labels, bucket_cap: int | None = None, sizes: Sequence[int] | None = None):
        super().__init__()
        self.urls, self.transform, self.tokenizer, self.sizes = list(urls), transform, tokenizer, sizes
        self.batch_size, self.worker_batches, self.bucket_cap = batch_size, worker_batches, bucket_cap
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer, self.labeler = shuffle_buffer, labeler
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
            rng = random.Random(_seed(self.seed, self.epoch, slot, rnd))
            order = shards[:]
            rng.shuffle(order)
            stream = wds.DataPipeline(lambda: iter(order), *good_samples(self.problems),
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
                if made == done:  # the counts so far are in the checkpoint (train_log.LoaderProgress)
                    stats.restart()
                    self.problems.restart()
                continue
            info = BatchInfo(worker, made, self.problems.as_list(), dataclasses.replace(stats))
            yield decode_batch(plan, self.transform, self.tokenizer, self.batch_size, blank, self.seed, self.epoch,
                               self.problems, info)

    def padding(self) -> Batch:
        """A batch of padding alone, for a rank whose data ran out before the others'."""
        return Batch.padding(self.batch_size, blank_image(self.transform), self.tokenizer)


def stream_role(start: dict[int, int]) -> tuple[int, int]:
    """(the stream this DataLoader worker process plays, workers). Stream w makes batches
    w, w + workers, ... of the epoch's order; `start` holds each stream's batches made
    before a resume. The DataLoader asks its worker 0 first, while the next batch in order
    belongs to stream `consumed % workers`: the processes take the streams rotated by that
    much, so a resumed epoch goes on in the uninterrupted order."""
    info = get_worker_info()
    process, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return (process + sum(start.values())) % workers, workers


def blank_image(transform) -> torch.Tensor:
    """The transformed image of a masked entry (padding, or an image that did not decode)."""
    return transform(Image.new("RGB", (8, 8)))


def decode_batch(samples: Sequence[dict], transform, tokenizer, size: int, blank: torch.Tensor, seed: int,
                 epoch: int, problems: ProblemLog, info: BatchInfo) -> Batch:
    """Decode and transform the samples of one batch plan (an image that fails to decode is
    a masked entry, counted); each image's augmentation seeded by the sample, so that
    skipping batches on a resume shifts no one's randomness."""
    images, valid = [], []
    for s in samples:
        try:
            img = decode_image(s["image"])
        except Exception as exc:  # noqa: BLE001 - any decoder failure: a masked entry
            problems.add("corrupt_image", s["__url__"], s["__key__"], str(exc)[:200])
            images.append(blank)
            valid.append(False)
            continue
        # the CPU generator alone: torch.manual_seed also queues a CUDA seed with a stack trace
        torch.default_generator.manual_seed(_seed(seed, epoch, s["round"], s["__url__"], s["__key__"]))
        images.append(transform(img))
        valid.append(True)
    info = info._replace(problems=problems.as_list())  # with the problems met decoding this batch
    return Batch.of(samples, images, valid, size, blank, tokenizer, info)


def epoch_plan(num_samples: int, batch_size: int, world_size: int, workers: int) -> tuple[int, int]:
    """(batches per worker, steps per epoch), rounded up as open_clip does."""
    num_batches = math.ceil(num_samples / (batch_size * world_size))
    worker_batches = math.ceil(num_batches / max(1, workers))
    return worker_batches, worker_batches * max(1, workers)


def make_loader(stream: TrainStream, workers: int, seed: int, worker_init_fn=None) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False,
                      pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers else None,
                      generator=torch.Generator().manual_seed(seed), worker_init_fn=worker_init_fn)


WORKER_START_TIMEOUT_S = 60


def _mark_started(counter, worker_id: int) -> None:
    with counter.get_lock():
        counter.value += 1


def start_batches(stream: TrainStream, workers: int, seed: int, timeout: float = WORKER_START_TIMEOUT_S):
    """`iter(make_loader(...))`, once every worker process has started. A worker forked while
    another thread of the rank held CPython's runtime lock never starts: Python 3.11 takes that
    lock in the child before it re-creates it (seen here: a worker stuck in PyOS_AfterFork_Child
    at an epoch's start, the ranks waiting on it for good). Such a start is shut down and made
    again, with a warning; the epoch's batches are the same, as nothing was consumed yet."""
    import multiprocessing

    if not workers:
        return iter(make_loader(stream, workers, seed))
    for _ in range(3):
        started = multiprocessing.get_context("fork").Value("i", 0)
        batches = iter(make_loader(stream, workers, seed, functools.partial(_mark_started, started)))
        deadline = time.monotonic() + timeout
        while started.value < workers and time.monotonic() < deadline:
            time.sleep(0.02)
        if started.value >= workers:
            return batches
        log.warning("%d of %d DataLoader workers did not start within %.0f s (stuck after fork); "
                    "starting them again", workers - started.value, workers, timeout)
        batches._shutdown_workers()  # terminates the stuck ones
    raise RuntimeError(f"DataLoader workers did not start within {timeout:.0f} s, three times")
