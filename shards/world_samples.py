"""Reading generated shards back with their world: the spec and the samples' attributes."""
from __future__ import annotations

import json
from pathlib import Path

from common.cli import UsageError
from shards import world as W
from shards.reader import ProblemLog, expand_urls, read_samples


def read_world(data: str, what: str) -> W.WorldSpec:
    """The spec the shards of `data` were generated with (their folder's world.json); `what`
    needs it, as the error says."""
    record = Path(expand_urls(data)[0]).parent / "world.json"
    if not record.is_file():
        raise UsageError(f"{record}: missing; {what} need shards of the synthetic world (shards.generate)")
    return W.spec_from_dict(json.loads(record.read_text())["world"], source=str(record))


def labelled_samples(data: str, max_samples: int, captions: bool = True) -> list[dict]:
    """Up to `max_samples` decoded samples of `data` that carry their attributes, in order
    (without `captions`, samples without one count too: image-only shards)."""
    samples = []
    for s in read_samples(data, ProblemLog(), captions=captions):
        if isinstance(s["json"], dict) and "attributes" in s["json"]:
            samples.append(s)
        if len(samples) >= max_samples:
            break
    return samples
