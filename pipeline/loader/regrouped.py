"""The streamed same-group loader (`bucket=stream`): a regroup job's files, read whole and in order.

pipeline.regroup wrote the stage's samples laid out by group (pipeline.loader.group_layout):
one file per bundle and rank. Here a rank's DataLoader workers read only that rank's files,
each once per epoch, sequentially, from any URL webdataset or fsspec opens (a folder, http(s),
s3, gs): no random access. The bundles are dealt to the workers by the epoch's seed, the same
on every rank; a worker shuffles each chunk's part in memory (at most `chunk_steps` x B
samples) and cuts it into the chunk's batches, so step t is one group on every rank (or, in a
mixed step, the masked leftovers of several), every sample is read once an epoch, and the
samples that share a step change from epoch to epoch.

Resume: a worker skips the bundles (unread) and chunks (read, not decoded) that the batches
made before the resume point cover; the process-to-stream roles keep the DataLoader's order
(group_layout.stream_roles), so a resumed epoch makes the batches of an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import logging

from torch.utils.data import IterableDataset, get_worker_info

from common.cli import UsageError
from pipeline.loader.batch import BatchInfo
from pipeline.loader.buckets import BucketStats
from pipeline.loader.decode import blank_image, decode_batch
from pipeline.loader.group_layout import MIXED, _rng, epoch_bundles, stream_roles
from pipeline.loader.groups import LEVEL_SHIFT
from pipeline.loader.labels import stable_hash64
from shards.reader import ProblemLog, check_samples, tar_samples

log = logging.getLogger("pipeline.loader")
LAYOUT = "layout.json"


def read_layout(root: str) -> dict:
    """The regroup job's record at `root` (a folder or URL); one line when there is none."""
    import fsspec

    try:
        fs, base = fsspec.core.url_to_fs(root.rstrip("/"))
        return json.loads(fs.cat_file(f"{base}/{LAYOUT}"))
    except FileNotFoundError:
        raise UsageError(f"{root}: no {LAYOUT}; run the regroup step (python -m pipeline.regroup) first") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{root}/{LAYOUT}: cannot read ({str(exc)[:200]})") from None


def missing_files(root: str, meta: dict, rank: int | None = None) -> list[str]:
    """The files of the layout record `meta` (of `rank`, or of every rank) not at `root`
    (one listing)."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(root.rstrip("/"))
    present = {name.rsplit("/", 1)[-1] for name in fs.ls(base, detail=False)}
    wanted = [name for row in meta["files"] for r, name in enumerate(row) if rank is None or r == rank]
    return [name for name in wanted if name not in present]


class RegroupedStream(IterableDataset):
    """This rank's batches from the regrouped files at `root`; like GlobalBatchStream, each
    batch's `info` carries its worker's position, problems and counters."""

    def __init__(self, root: str, transform, tokenizer, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, captions: bool = True):
        super().__init__()
        self.captions = captions  # False: image-only training, a sample needs no caption
        self.root = root.rstrip("/")
        self.meta = read_layout(self.root)
        if (self.meta["world_size"], self.meta["batch_size"]) != (world_size, batch_size):
            raise UsageError(f"{self.root}: regrouped for {self.meta['world_size']} ranks x {self.meta['batch_size']}, "
                             f"not this training's {world_size} x {batch_size}; regroup for it")
        self.transform, self.tokenizer, self.batch_size = transform, tokenizer, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.global_batch = batch_size * world_size
        self.bundles = self.meta["bundles"]
        self.bundle_steps = [sum(c["steps"] for c in chunks) for chunks in self.bundles]
        self.levels = int(self.meta.get("levels", 0))  # a group of a lower level fell back to it
        self.epoch, self.start = 0, {}
        self.problems = ProblemLog()
        self._check_files()

    def _check_files(self) -> None:
        """This rank's files are all there (one listing): a vanished one is named, not read
        as an unreadable shard step after step."""
        missing = missing_files(self.root, self.meta, self.rank)
        if missing:
            raise UsageError(f"{self.root}/{missing[0]}: missing ({len(missing)} of this rank's regrouped files); "
                             "run the regroup step again (it writes only what is missing)")

    @property
    def samples(self) -> int:
        return int(self.meta["samples"])

    def steps_per_epoch(self) -> int:
        return sum(self.bundle_steps)

    def set_epoch(self, epoch: int, start: dict[int, int] | None = None) -> None:
        self.epoch, self.start = epoch, dict(start or {})

    def url(self, bundle: int) -> str:
        return f"{self.root}/{self.meta['files'][bundle][self.rank]}"

    def __iter__(self):
        info = get_worker_info()
        process, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        dealt = epoch_bundles(self.bundle_steps, self.epoch, self.seed, workers)
        lengths = [sum(self.bundle_steps[b] for b in bundles) for bundles in dealt]
        worker = stream_roles(lengths, self.start)[process]
        done = self.start.get(worker, 0)
        stats, made = BucketStats(max_buffered=0), 0
        self.problems = ProblemLog()
        blank = blank_image(self.transform)
        for b in dealt[worker]:
            if made + self.bundle_steps[b] <= done:
                made += self.bundle_steps[b]  # made before the resume: the file is not read
                continue
            raws = iter(tar_samples(self.problems)([self.url(b)]))
            for position, chunk in enumerate(self.bundles[b]):
                part = [raw for raw in (next(raws, None) for _ in range(chunk["parts"][self.rank])) if raw is not None]
                if made + chunk["steps"] <= done:
                    made += chunk["steps"]
                    continue
                stats.max_buffered = max(stats.max_buffered, len(part))
                order = _rng(self.seed, "chunk", self.epoch, b, position, self.rank).permutation(len(part))
                part = [part[i] for i in order]
                for k in range(chunk["steps"]):
                    made += 1
                    if made <= done:
                        continue
                    entries = part[k * self.batch_size:(k + 1) * self.batch_size]
                    samples = self._checked(entries, chunk["group"])
                    stats.count_step(len(entries), chunk["group"] != MIXED, self.batch_size)
                    stats.fallback_samples += sum(int(s["label"]) >> LEVEL_SHIFT < self.levels for s in samples)
                    info = BatchInfo(worker, made, self.problems.as_list(), dataclasses.replace(stats))
                    yield decode_batch(samples, self.transform, self.tokenizer, self.batch_size, blank, self.seed,
                                       self.epoch, self.problems, info)

    def _checked(self, raws: list[dict], group: int) -> list[dict]:
        """The batch's samples as every reader checks them, labelled with their group: the
        chunk's, or in a mixed chunk each sample's own (its .cls member)."""
        out = []
        for raw in raws:
            label = raw.pop("cls", None) if group == MIXED else str(group).encode()
            if label is None:
                raise UsageError(f"{raw['__url__']}: sample {raw['__key__']} has no .cls member: not a regrouped "
                                 "file (pipeline.regroup writes them)")
            raw["__duplicate__"] = False  # two sources' samples may share a key: the regroup keeps both
            checked = next(iter(check_samples(self.problems, captions=self.captions)([raw])), None)
            if checked is None:
                continue
            group = int(label)
            checked.update(label=group, parent=group, caption_id=stable_hash64(checked["text"]), round=0)
            out.append(checked)
        return out
