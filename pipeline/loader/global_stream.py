"""The global-batch loader: every step, all ranks' batches from one pseudo-label group.

Each rank evaluates the same seeded plan (pipeline.loader.global_batches) over every sample of
the data set, takes its B columns of each global step, and reads those samples by random
access: the stage's sidecars record where each sample's members lie in its tar (`offset`,
`length`, taken from the embed job's pass over the shards), so one sample is one read of
one byte range (shards.reader.read_span). Its DataLoader workers take every workers-th
step; the DataLoader's round-robin hands them back in plan order.

Why random access, and what it costs (the alternatives considered):
- Per-slot bucketing of streamed shards (pipeline.loader.buckets, `bucket: slot`) reads every
  shard sequentially, but each rank's batch is one group and the gathered batch mixes W
  groups: an anchor keeps ~B + (W-1)*B/L of its W*B - 1 negatives (bench/loader_scale.py).
- A `regroup` job writing label-ordered shards after each assign would let training stream
  sequentially on a global schedule, at the price of one read and one write of the whole
  data set per stage (a second copy of CC12M on the file system or bucket), and the same
  samples would share batches every epoch unless the regroup is redone.
- Ranks agreeing each step on a group all of them have ready (coordinated streaming) needs
  each worker to buffer about a batch of every group: memory grows with the number of
  groups (1,000 at stage 4 of K = 10).
- Random access (this module) needs the samples to be seekable: shards on a local disk or
  a shared file system (Lustre, GPFS, NFS: one pread of ~one sample per sample; the page
  cache keeps repeats cheap). On object storage (S3) the same reads are HTTP range GETs,
  one per sample (~10-50 ms each: a worker needs many in flight); this loader opens local
  paths only and says so for other URLs (stream those with `bucket: slot`, or mount them).
  Memory: the epoch's plan, an int64 per sample, in each rank (80 MB at 10 M samples; about
  six times that while it is computed), the index (shard, offset, length, key hash, label:
  36 bytes a sample), and in a worker one batch of samples and up to 64 open shard files.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Sequence
from urllib.parse import urlparse

import numpy as np
import pyarrow.parquet as pq
from torch.utils.data import IterableDataset

from common.cli import UsageError
from pipeline.artifacts import sidecar_skipped
from pipeline.loader import stage_index
from pipeline.loader.batch import BatchInfo
from pipeline.loader.buckets import BucketStats
from pipeline.loader.decode import blank_image, decode_batch
from pipeline.loader.labels import stable_hash64
from pipeline.loader.workers import stream_role
from pipeline.loader.global_batches import PAD, EpochPlan, plan_epoch, steps_per_epoch
from pipeline.loader.groups import coarse_groups
from pipeline.stage import StageDir, labels_for_training
from shards.reader import ProblemLog, check_samples, is_local, local_path, read_span

log = logging.getLogger("pipeline.loader")


def open_seekable(url: str):
    """A remote shard opened for reads at byte offsets (fsspec: one range request a read)."""
    import fsspec

    return fsspec.open(url, "rb").open()


class OpenShards:
    """A worker's open shard files, the `size` most recently used (random access touches
    every shard: 10,000 open files would pass the usual limit of 1,024); local paths, or
    remote URLs read by range (the regroup job's reads)."""

    def __init__(self, size: int = 64):
        self.size, self.files = size, collections.OrderedDict()

    def get(self, url: str):
        f = self.files.pop(url, None)
        if f is None:
            f = open(local_path(url), "rb") if is_local(url) else open_seekable(url)
            if len(self.files) >= self.size:
                self.files.popitem(last=False)[1].close()
        self.files[url] = f
        return f

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


@dataclasses.dataclass
class SampleIndex:
    """Every sample a stage's sidecars list: its shard (index into `urls`), byte span, a
    hash of its key (checked against what the span holds) and packed pseudo-label;
    `skipped` counts the samples the embed job could not use, by kind."""
    urls: list[str]
    shard: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    key_hash: np.ndarray
    label: np.ndarray
    ks: tuple
    skipped: dict[str, int]

    def __len__(self) -> int:
        return len(self.label)


def random_access_refusal(urls: Sequence[str]) -> str | None:
    """Why `bucket=global` cannot read these shards (one line), or None: it reads samples by
    byte offset, so the shards must be local (or mounted) uncompressed tars."""
    remote = [u for u in urls if not is_local(u)]
    if remote:
        return (f"bucket=global reads samples by random access and needs local or mounted shards, not "
                f"{remote[0]}; mount the data or use bucket=stream (train.bucket in a run config: the regroup "
                f"step's shards, read whole)")
    return compressed_refusal(urls, "bucket=global")


def compressed_refusal(urls: Sequence[str], who: str) -> str | None:
    """Why `who` cannot read samples of these shards by byte offset (compressed), or None."""
    packed = [u for u in urls if not urlparse(u).path.endswith(".tar") and not local_path(u).name.endswith(".tar")]
    if packed:
        return (f"{who} reads samples by their byte offsets and needs uncompressed .tar shards, not "
                f"{packed[0]}; use bucket=slot for compressed shards")
    return None


def load_index(stage: StageDir, urls: Sequence[str], for_loader: bool = True) -> SampleIndex:
    """The random-access index of `urls` from the stage's sidecars (checked current first);
    `for_loader`: refuse shards this loader cannot read by offset (the regroup job reads
    remote ones by range requests, in batches)."""
    problem = random_access_refusal(urls) if for_loader else None
    if problem:
        raise UsageError(problem)
    index = stage_index.read(stage, urls)
    if index is not None:
        log.info("%s: %d samples mapped from the stage index", stage.path, len(index))
        return index
    log.warning("%s: no current stage index (the reduce step writes it); reading %d sidecars", stage.path, len(urls))
    return read_index(stage, urls, tuple(labels_for_training(stage, urls).ks))


def read_index(stage: StageDir, urls: Sequence[str], ks: tuple) -> SampleIndex:
    """The index columns of the sidecars of `urls` (unchecked: `load_index` checks first)."""
    shards, offsets, lengths, keys, labels, skipped = [], [], [], [], [], collections.Counter()
    for i, (url, path) in enumerate(zip(urls, stage.sidecar_paths(urls))):
        table = pq.read_table(path, columns=["key", "label", "offset", "length"])
        n = table.num_rows
        length = table.column("length").to_numpy()
        if n and (length <= 0).any():
            raise UsageError(f"{path}: a sidecar without byte spans; rerun the embed and assign steps of {stage.path}")
        shards.append(np.full(n, i, dtype=np.int32))
        offsets.append(table.column("offset").to_numpy())
        lengths.append(length)
        keys.append(np.fromiter((stable_hash64(k) for k in table.column("key").to_pylist()), np.int64, n))
        labels.append(table.column("label").to_numpy())
        skipped.update((sidecar_skipped(path) or {}).values())
    cat = (lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype))
    return SampleIndex(list(urls), cat(shards, np.int32), cat(offsets, np.int64), cat(lengths, np.int64),
                       cat(keys, np.int64), cat(labels, np.int64), tuple(ks), dict(skipped))


class GlobalBatchStream(IterableDataset):
    """`Batch`es of `batch_size` for one rank; every step of an epoch draws the W ranks'
    batches from one group (or, counted, from groups' leftovers: a mixed step).

    The same interface as pipeline.loader.slot.TrainStream: `set_epoch(epoch, start)` (start:
    {worker: batches it had made}, for an exact resume; pipeline.loader.workers.stream_role), iteration
    in a DataLoader, each batch's `info` its worker's position, problems and counters (in a
    resumed epoch: since the resume point)."""

    def __init__(self, index: SampleIndex, transform, tokenizer, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, min_batches: float = 1.0, captions: bool = True):
        super().__init__()
        self.index, self.transform, self.tokenizer = index, transform, tokenizer
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.global_batch = batch_size * world_size
        self.group, self.parent, self.fell = coarse_groups(index.label, index.ks, min_batches * self.global_batch)
        self.epoch, self.start, self.plan, self.mine = 0, {}, None, None
        self.problems = ProblemLog()
        self.captions = captions  # False: image-only training, a sample needs no caption

    def steps_per_epoch(self) -> int:
        _, counts = np.unique(self.group, return_counts=True)
        return steps_per_epoch(len(self.group), counts, self.global_batch)

    def set_epoch(self, epoch: int, start: dict[int, int] | None = None) -> None:
        """Plan `epoch` (in this process: the DataLoader's workers inherit this rank's share)."""
        self.epoch, self.start = epoch, dict(start or {})
        self.plan: EpochPlan = plan_epoch(self.group, self.parent, self.global_batch, self.seed, epoch, self.fell)
        self.mine = self.plan.for_rank(self.rank, self.batch_size)

    def __iter__(self):
        worker, workers = stream_role(self.start)
        if self.mine is None:
            self.set_epoch(self.epoch, self.start)
        stats, files = BucketStats(max_buffered=self.batch_size), OpenShards()
        self.problems = ProblemLog()  # this epoch's (a worker process's own)
        blank, done = blank_image(self.transform), self.start.get(worker, 0)
        try:
            for made, step in enumerate(range(worker, len(self.mine), workers), start=1):
                if made <= done:
                    continue  # consumed before a resume: not read
                indices = [int(i) for i in self.mine[step] if i != PAD]
                samples = [s for s in (self._read(i, files) for i in indices) if s is not None]
                stats.count_step(len(indices), bool(self.plan.pure[step]), self.batch_size)
                stats.fallback_samples += int(self.fell[indices].sum()) if indices else 0
                info = BatchInfo(worker, made, self.problems.as_list(), dataclasses.replace(stats))
                yield decode_batch(samples, self.transform, self.tokenizer, self.batch_size, blank, self.seed,
                                   self.epoch, self.problems, info)
        finally:
            files.close()

    def _read(self, i: int, files: "OpenShards") -> dict | None:
        """Sample `i`, checked as every reader checks; None (counted) when it cannot be read,
        is not the sample indexed there or no longer passes (the shard changed since the
        embed job indexed it)."""
        url, start = self.index.urls[int(self.index.shard[i])], int(self.index.offset[i])
        try:
            raw = read_span(files.get(url), url, start, start + int(self.index.length[i]))
            if stable_hash64(raw["__key__"]) != self.index.key_hash[i]:
                raise ValueError(f"holds key {raw['__key__']}, not the one indexed (the shard was rewritten)")
        except Exception as exc:  # noqa: BLE001 - a moved, truncated or rewritten shard: counted, masked
            self.problems.add("unreadable_shard", url, f"@{start}", f"bytes at {start}: {str(exc)[:200]}")
            return None
        checked = next(iter(check_samples(self.problems, captions=self.captions)([raw])), None)
        if checked is not None:
            checked.update(label=int(self.group[i]), parent=int(self.parent[i]),
                           caption_id=stable_hash64(checked["text"]), round=0)
        return checked
