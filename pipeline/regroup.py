"""Write a stage's samples again, laid out by pseudo-label group, for the next stage to stream.

    python -m pipeline.regroup --stage runs/r/stage1 --data SPEC --world-size 64 --batch-size 256 \\
        [--out s3://bucket/r/stage1] [--task I --tasks N]

After the reduce step (its index of the stage's labels and byte spans: pipeline.loader.
stage_index), the samples are laid out by pipeline.loader.group_layout for the next stage's
W x B: groups below one global batch fall back to their parent, each group's steps are cut
into chunks, the chunks packed into bundles. Bundle b is written as one webdataset tar per
rank, `b<b>-r<rank>-<fingerprint>.tar`, holding that rank's parts of the bundle's chunks:
each sample's tar members copied byte for byte from its shard (no re-encoding, the key kept),
in a mixed chunk followed by a `<key>.cls` member, its group (a pure chunk's group is in the
record). Samples an earlier job could not use are not in the index and stay out; their counts
go into the layout record. `OUT/layout.json` records the layout (per
bundle, each chunk's group, steps and the samples of each rank's part), the stage record,
W x B and a fingerprint of everything the layout depends on.

OUT is a folder or any URL fsspec writes (s3://, gs://, ...); default STAGE/regrouped. Task I
of N writes bundles I, I + N, ...; a file is written whole (a temporary file renamed, or one
upload that appears complete), and one already there is kept, so a rerun after a kill writes
only what is missing; another layout's files (other labels, W x B or seed) have other names.
The source shards are read at their byte offsets: local or mounted files, or remote ones by
range requests, 256 samples' at a time, concurrently (fsspec's cat_ranges).
"""
from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from common.cli import UsageError, run_main, setup_logging
from common.spec import check, fingerprint, from_args, param, parser
from pipeline.loader.global_stream import OpenShards, compressed_refusal, load_index
from pipeline.loader.group_layout import MIXED, Layout, lay_out
from pipeline.loader.groups import coarse_groups
from pipeline.loader.labels import stable_hash64
from pipeline.loader.regrouped import LAYOUT, missing_files, read_layout
from pipeline.stage import StageDir, current_record
from shards.reader import expand_urls, is_local, read_span

log = logging.getLogger("pipeline.regroup")


@dataclass(frozen=True)
class RegroupSpec:
    """A stage's samples laid out by group for a training of `world_size` x `batch_size`."""
    stage: str = param(help="stage folder whose labels lay the data out (its reduce step done)", result=False)
    data: str = param(help="the shard spec the stage was made from", result=False)
    world_size: int = param(help="ranks of the training that streams the regrouped shards")
    batch_size: int = param(help="that training's batch per rank")
    out: str | None = param(None, "where the shards go: a folder or a URL fsspec writes; default STAGE/regrouped",
                            result=False)
    fallback_min_batches: float = param(1.0, "groups below this many global batches fall back to their parent")
    chunk_steps: int = param(8, "global steps of one group a worker shuffles together (its memory: this x B)")
    file_samples: int = param(10_000, "samples per rank and file, about (fewer requests; the loader reads whole files)")
    seed: int = param(0, "the layout's seed")
    task: int = param(0, "this task's index", result=False, env="SLURM_ARRAY_TASK_ID")
    tasks: int = param(1, "number of tasks", result=False, env="SLURM_ARRAY_TASK_COUNT")

    def problems(self) -> list[str]:
        return [f"{name}: must be >= 1, got {getattr(self, name)}" for name in
                ("world_size", "batch_size", "chunk_steps", "file_samples", "tasks")
                if getattr(self, name) < 1] + \
            ([f"task: must be in 0..{self.tasks - 1}, got {self.task}"] if not 0 <= self.task < self.tasks else [])


def out_url(spec: RegroupSpec) -> str:
    return (spec.out or str(StageDir(spec.stage).path / "regrouped")).rstrip("/")


def file_name(bundle: int, rank: int, fp: str) -> str:
    """Rank `rank`'s file of bundle `bundle` in the layout of fingerprint `fp` (another
    layout's files never take its place)."""
    return f"b{bundle:06d}-r{rank:04d}-{fp[:8]}.tar"


def _cls_member(key: str, group: int) -> bytes:
    data = str(group).encode()
    info = tarfile.TarInfo(f"{key}.cls")
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    return info.tobuf(tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def plan(spec: RegroupSpec):
    """(layout, the index it was made from, coarse group per sample, the layout record)."""
    stage = StageDir(spec.stage)
    urls = expand_urls(spec.data)
    problem = compressed_refusal(urls, "the regroup step")
    if problem:
        raise UsageError(problem)
    index = load_index(stage, urls, for_loader=False)  # the stage index, else the sidecars
    g = spec.world_size * spec.batch_size
    group, parent, fell = coarse_groups(index.label, index.ks, spec.fallback_min_batches * g)
    layout = lay_out(group, parent, spec.world_size, spec.batch_size, spec.chunk_steps,
                     max(1, spec.file_samples // spec.batch_size), spec.seed)
    record = current_record(stage).to_json()
    fp = fingerprint(spec, record=record, samples=len(group))
    return layout, index, group, layout_record(layout, fp, record, int(fell.sum()), index.skipped, spec.seed,
                                               len(index.ks))


def layout_record(layout: Layout, fp: str, record: dict, fallback_samples: int, skipped: dict, seed: int,
                  levels: int) -> dict:
    """OUT/layout.json: what the streamed loader needs of the layout, and what it was made from
    (`levels`: the clusterings the labels combine; a group of a lower level fell back)."""
    parts = layout.part_sizes()
    return {
        "fingerprint": fp, "world_size": layout.world, "batch_size": layout.batch, "seed": seed,
        "samples": len(layout.order), "fallback_samples": fallback_samples, "skipped": skipped, "levels": levels,
        "stats": layout.stats, "record": record,
        "bundles": [[{"group": int(layout.chunks[c].group), "steps": layout.chunks[c].steps,
                      "parts": parts[c].tolist()} for c in members] for members in layout.bundles],
        "files": [[file_name(b, r, fp) for r in range(layout.world)] for b in range(len(layout.bundles))],
    }


def _write_file(fs, path: str, data_iter) -> None:
    """Write a whole file: a temporary name renamed (a folder), or one upload that appears
    complete when it closes (object storage): a file that exists is complete."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        from common.io import atomic_output

        with atomic_output(path, "wb") as f:
            for block in data_iter:
                f.write(block)
        return
    with fs.open(path, "wb") as f:
        for block in data_iter:
            f.write(block)


def _spans(index, ids: list[int], files: OpenShards) -> list[bytes]:
    """The bytes of samples `ids`: local shards read at their offsets, remote ones fetched
    together by range requests (fsspec's cat_ranges: concurrent, no read-ahead wasted)."""
    import fsspec

    out: dict[int, bytes] = {}
    remote: dict = {}
    for i in ids:
        url, start, end = index.urls[int(index.shard[i])], int(index.offset[i]), int(index.offset[i] + index.length[i])
        if is_local(url):
            source = files.get(url)
            source.seek(start)
            out[i] = source.read(end - start)
        else:
            fs, path = fsspec.core.url_to_fs(url)
            remote.setdefault(id(fs), (fs, []))[1].append((i, path, start, end))
    for fs, wanted in remote.values():
        got = fs.cat_ranges([w[1] for w in wanted], [w[2] for w in wanted], [w[3] for w in wanted])
        for (i, *_), data in zip(wanted, got):
            if isinstance(data, Exception):
                raise UsageError(f"{index.urls[int(index.shard[i])]}: cannot read bytes at {int(index.offset[i])} "
                                 f"({data})")
            out[i] = data
    return [out[i] for i in ids]


def _file_blocks(layout: Layout, index, group: np.ndarray, bundle: int, rank: int, files: OpenShards,
                 batch: int = 256):
    ids = layout.file(bundle, rank).tolist()
    mixed = set(np.concatenate([layout.part(c, rank) for c in layout.bundles[bundle]
                                if layout.chunks[c].group == MIXED] or [np.zeros(0, np.int64)]).tolist())
    for begin in range(0, len(ids), batch):
        block = ids[begin:begin + batch]
        for i, raw in zip(block, _spans(index, block, files)):
            url = index.urls[int(index.shard[i])]
            sample = read_span(io.BytesIO(raw), url, 0, len(raw))
            if stable_hash64(sample["__key__"]) != index.key_hash[i]:
                raise UsageError(f"{url}: bytes at {int(index.offset[i])} hold key {sample['__key__']}, not the "
                                 "sample the stage indexed (the shard changed since embed); rerun the stage's embed "
                                 "and assign steps")
            yield raw + _cls_member(sample["__key__"], int(group[i])) if i in mixed else raw
    yield b"\0" * (2 * tarfile.BLOCKSIZE)


def regroup(spec: RegroupSpec) -> dict:
    """Write this task's bundles (and the layout record); returns the record."""
    check(spec)
    layout, index, group, meta = plan(spec)
    written, kept = write(layout, index, group, meta, out_url(spec), spec.task, spec.tasks)
    log.info("regroup task %d of %d: %d files written, %d kept, to %s (%d bundles x %d ranks in all; %d samples, "
             "%d fall back)", spec.task, spec.tasks, written, kept, out_url(spec), len(layout.bundles), layout.world,
             meta["samples"], meta["fallback_samples"])
    return meta


def write(layout: Layout, index, group: np.ndarray, meta: dict, root: str, task: int = 0, tasks: int = 1):
    """Write the layout record and bundles task, task + tasks, ... at `root` (files already
    there are kept); (files written, files kept)."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(root)
    try:
        fs.makedirs(base, exist_ok=True)
        _write_file(fs, f"{base}/{LAYOUT}", [json.dumps(meta).encode()])
    except OSError as exc:
        raise UsageError(f"{root}: cannot write the regrouped shards ({exc})") from None
    mine = list(range(task, len(layout.bundles), tasks))
    files, written, kept, started = OpenShards(), 0, 0, time.perf_counter()
    try:
        for n, b in enumerate(mine, start=1):
            for r in range(layout.world):
                path = f"{base}/{meta['files'][b][r]}"
                if fs.exists(path):
                    kept += 1
                    continue
                _write_file(fs, path, _file_blocks(layout, index, group, b, r, files))
                written += 1
            if n % 10 == 0 or n == len(mine):
                rate = n / max(time.perf_counter() - started, 1e-9)
                log.info("regroup task %d: bundle %d of %d (%.2f/s, ETA %.0f s)", task, n, len(mine), rate,
                         (len(mine) - n) / max(rate, 1e-9))
    finally:
        files.close()
    return written, kept


def is_done(spec: RegroupSpec) -> bool:
    """Every file of the layout is there (written whole: one that exists is complete), made
    from the stage's current labels for this W x B (all tasks')."""
    try:
        meta = read_layout(out_url(spec))
        record = current_record(StageDir(spec.stage)).to_json()
        if meta["fingerprint"] != fingerprint(spec, record=record, samples=meta["samples"]):
            return False
        return not missing_files(out_url(spec), meta)
    except (OSError, ValueError, KeyError, UsageError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    spec = from_args(RegroupSpec, parser(RegroupSpec, "python -m pipeline.regroup", __doc__).parse_args(argv))
    setup_logging()
    regroup(spec)
    return 0


if __name__ == "__main__":
    run_main(main, "python -m pipeline.regroup")
