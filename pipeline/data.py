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

import hashlib
import logging
import math
import random
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import _shuffle

from shards.reader import ProblemLog, check_samples, decode_image, tar_samples

log = logging.getLogger("pipeline.data")
Labeler = Callable[[dict], int]


def stable_hash64(text: str) -> int:
    """A signed int64 hash of a string, the same in every process and run."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def no_labels(sample: dict) -> int:
    return 0


def json_labeler(path: str) -> Labeler:
    """Label = hash of a field of the sample's json (e.g. "attributes.shape")."""
    keys = path.split(".")

    def label(sample: dict) -> int:
        value = sample.get("json")
        for k in keys:
            if not isinstance(value, dict) or k not in value:
                raise KeyError(f"{sample['__url__']} key {sample['__key__']}: json has no field {path!r}")
            value = value[k]
        return stable_hash64(repr(value))

    return label


def _seed(*parts) -> int:
    return stable_hash64(":".join(map(str, parts))) & 0x7FFF_FFFF_FFFF_FFFF


def shards_for_slot(urls: Sequence[str], slot: int, slots: int) -> list[str]:
    """Shards of one (rank, worker) slot: every slots-th shard; with fewer shards than slots,
    slots share shards (each slot still gets one)."""
    if len(urls) >= slots:
        return list(urls[slot::slots])
    return [urls[slot % len(urls)]]


class TrainStream(IterableDataset):
    """Batches (images, tokens, labels, caption_ids, position) for one rank."""

    def __init__(self, urls: Sequence[str], transform, tokenizer, batch_size: int, worker_batches: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1000,
                 labeler: Labeler = no_labels):
        super().__init__()
        self.urls, self.transform, self.tokenizer = list(urls), transform, tokenizer
        self.batch_size, self.worker_batches = batch_size, worker_batches
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer, self.labeler = shuffle_buffer, labeler
        self.epoch = 0
        self.start: dict[int, tuple[int, int]] = {}  # worker -> (raw samples, batches) already consumed
        self.problems = ProblemLog()

    def set_epoch(self, epoch: int, start: dict[int, tuple[int, int]] | None = None) -> None:
        self.epoch, self.start = epoch, dict(start or {})

    def _raw(self, worker: int, workers: int) -> Iterator[dict]:
        """Checked, labelled, shuffled, undecoded samples of this slot, forever."""
        slot, slots = self.rank * workers + worker, self.world_size * workers
        shards = shards_for_slot(self.urls, slot, slots)
        for rnd in range(1 << 62):
            rng = random.Random(_seed(self.seed, self.epoch, slot, rnd))
            order = shards[:]
            rng.shuffle(order)
            stream = check_samples(self.problems)(tar_samples(self.problems)(order))
            n = 0
            for s in _shuffle(stream, self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng):
                n += 1
                s["label"] = self.labeler(s)
                s["caption_id"] = stable_hash64(s["text"])
                s["round"] = rnd
                yield s
            if n == 0:
                raise RuntimeError(f"no usable samples in shards {order} ({self.problems.summary()})")

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        raw_done, batches_done = self.start.get(worker, (0, 0))
        raw = self._raw(worker, workers)
        for _ in range(raw_done):
            next(raw)
        while batches_done < self.worker_batches:
            images, texts, labels, caption_ids = [], [], [], []
            while len(images) < self.batch_size:
                s = next(raw)
                raw_done += 1
                try:
                    img = decode_image(s["image"])
                except Exception as exc:  # noqa: BLE001 - any decoder failure skips the sample
                    self.problems.add("corrupt_image", s["__url__"], s["__key__"], str(exc)[:200])
                    continue
                torch.manual_seed(_seed(self.seed, self.epoch, s["round"], s["__url__"], s["__key__"]))
                images.append(self.transform(img))
                texts.append(s["text"])
                labels.append(s["label"])
                caption_ids.append(s["caption_id"])
            batches_done += 1
            yield (torch.stack(images), self.tokenizer(texts), torch.tensor(labels, dtype=torch.int64),
                   torch.tensor(caption_ids, dtype=torch.int64),
                   torch.tensor([worker, raw_done, batches_done], dtype=torch.int64))


def epoch_plan(num_samples: int, batch_size: int, world_size: int, workers: int) -> tuple[int, int]:
    """(batches per worker, steps per epoch), rounded up as open_clip does."""
    num_batches = math.ceil(num_samples / (batch_size * world_size))
    worker_batches = math.ceil(num_batches / max(1, workers))
    return worker_batches, worker_batches * max(1, workers)


def make_loader(stream: TrainStream, workers: int, seed: int) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False,
                      pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers else None,
                      generator=torch.Generator().manual_seed(seed))
