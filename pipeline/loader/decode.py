"""Decoding one batch plan into a `Batch`, the same for every loader: a sample whose image
does not decode is a masked entry, counted; each image's augmentation is seeded by the sample."""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from pipeline.loader.batch import Batch, BatchInfo
from pipeline.loader.labels import seed_of
from shards.reader import ProblemLog, decode_image


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
        torch.default_generator.manual_seed(seed_of(seed, epoch, s["round"], s["__url__"], s["__key__"]))
        images.append(transform(img))
        valid.append(True)
    info = info._replace(problems=problems.as_list())  # with the problems met decoding this batch
    return Batch.of(samples, images, valid, size, blank, tokenizer, info)
