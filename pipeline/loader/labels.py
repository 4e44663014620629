"""Pseudo-labels of the streamed loader: sample -> (label, parent label).

The labels are the coarse group ids of pipeline.loader.groups, the same ids the global
plan uses; a sample's caption id is a hash of its text.
"""
from __future__ import annotations

import hashlib

from pipeline.artifacts import read_sidecar, sidecar_skipped
from pipeline.loader.buckets import BucketStats
from pipeline.stage import StageDir
from shards.reader import ProblemLog

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
    bucketing, whether it fell back to an ancestor): see `label_table`. A sample
    the embed job could not use (the sidecar's skip record: a corrupt image, ...) is skipped
    and counted under the same problem kind. A sample without an entry for no recorded
    reason is an error naming shard and key (a stale or foreign sidecar), or with
    `missing="own"` joins one label of its own and is counted.
    """

    def __init__(self, stage, expect, table: dict, missing: str = "error", paths: dict | None = None):
        self.stage, self.expect, self.table, self.missing = StageDir(stage), expect, table, missing
        self.paths = paths  # {url: sidecar} of the data set (StageDir.sidecar_paths); None: bare stems
        self._url, self._labels, self._skipped = None, {}, {}

    def __call__(self, sample: dict) -> tuple[int, int] | None:
        url = sample["__url__"]
        if url != self._url:
            path = self._path(url)
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
                raise KeyError(f"{self._path(url)}: no pseudo-label for key {sample['__key__']} "
                               f"of shard {url} (set missing_labels=own to give such samples a label of their own)"
                               + why)
            if self.stats is not None:
                self.stats.missing_labels += 1
            return MISSING_LABEL, MISSING_LABEL
        label, parent, fell_back = self.table[packed]
        if fell_back and self.stats is not None:
            self.stats.fallback_samples += 1
        return label, parent

    def _path(self, url: str):
        return self.paths[url] if self.paths is not None else self.stage.sidecar(url)


def seed_of(*parts) -> int:
    """A non-negative int64 seed from any parts (e.g. seed, epoch, shard, key)."""
    return stable_hash64(":".join(map(str, parts))) & 0x7FFF_FFFF_FFFF_FFFF
