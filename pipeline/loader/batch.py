"""The training batch: what the loaders (pipeline.loader) yields and the trainer consumes.

A `Batch` always holds `size` entries: the samples of its plan, then masked padding
entries (a blank image, an empty caption, label -1, `valid` False). A whole batch of
padding stands in for a rank whose data ran out before the others'. The DataLoader runs
with `batch_size=None`, so a Batch crosses from its worker as it is (pickled) and is
pinned through its own `pin_memory`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch

from pipeline.loader.buckets import BucketStats


class BatchInfo(NamedTuple):
    """Where the DataLoader worker that made a batch stands in its epoch."""
    worker: int
    made: int                 # batches this worker has made this epoch
    problems: list[int]       # the worker's ProblemLog counts so far (shards.reader.PROBLEM_KINDS order)
    stats: BucketStats        # the worker's bucketing counters so far
    # (both since the resume point in a resumed epoch: pipeline.trainer.log.LoaderProgress adds the rest)


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor       # uint8 [B, 3, H, W] (normalised on the device: pipeline.loader.images)
    tokens: torch.Tensor       # int [B, context length]
    labels: torch.Tensor       # int64 [B] pseudo-labels; -1 for padding
    caption_ids: torch.Tensor  # int64 [B] caption hashes; 0 for padding
    valid: torch.Tensor        # bool [B]; False for padding and undecodable images
    keys: list[str]            # the samples' keys; "" for padding
    info: BatchInfo | None = None  # None for a padding batch

    @classmethod
    def of(cls, samples: Sequence[dict], images: list[torch.Tensor], valid: list[bool], size: int,
           blank: torch.Tensor, tokenizer: Callable, info: BatchInfo | None = None) -> "Batch":
        """`samples` (with their `images`, `blank` where one did not decode) padded to `size`."""
        pad = size - len(samples)
        return cls(images=torch.stack(images + [blank] * pad),
                   tokens=tokenizer([s["text"] for s in samples] + [""] * pad),
                   labels=torch.tensor([s["label"] for s in samples] + [-1] * pad, dtype=torch.int64),
                   caption_ids=torch.tensor([s["caption_id"] for s in samples] + [0] * pad, dtype=torch.int64),
                   valid=torch.tensor(valid + [False] * pad, dtype=torch.bool),
                   keys=[s["__key__"] for s in samples] + [""] * pad, info=info)

    @classmethod
    def padding(cls, size: int, blank: torch.Tensor, tokenizer: Callable) -> "Batch":
        """`size` masked entries: no loss, no one's negatives."""
        return cls.of([], [], [], size, blank, tokenizer)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Batch":
        return dataclasses.replace(self, images=fn(self.images), tokens=fn(self.tokens), labels=fn(self.labels),
                                   caption_ids=fn(self.caption_ids), valid=fn(self.valid))

    def to(self, device: torch.device) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "Batch":
        return self._map(torch.Tensor.pin_memory)
