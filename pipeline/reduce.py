"""Summarise a stage's sidecars once every assign task is done: group sizes, NMI, a picture.

    python -m pipeline.reduce --stage runs/r/stage2 [--data SPEC]

Records the size of every pseudo-label group in `STAGE/sidecars/_groups.json` (how many
groups cannot fill a batch; with --global-batch, the shares of samples the next stage trains
in pure steps, mixed steps and fallback: refused past --max-fallback), the stage's index of
labels and byte spans that every training rank maps (pipeline.loader.stage_index), the
clusters' sizes, NMI and purity per attribute over all samples in
`STAGE/clusters/assign_stats.json` and, with `--data`, a PNG grid of sample images per cluster
with its most frequent caption words (`STAGE/clusters/grid.png`).
"""
from __future__ import annotations

import collections
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from common.cli import UsageError, run_main, setup_logging
from common.io import atomic_output, write_json
from common.spec import fingerprint, check, from_args, param, parser
from pipeline.artifacts import (StaleSidecarError, read_embeddings, read_sidecar_columns, shard_names,
                                sidecar_meta)
from pipeline.loader.stage_index import write as write_index
from pipeline.group_sizing import fallback_refusal, shares
from pipeline.metrics import attribute_nmi, attribute_purity
from pipeline.stage import StageDir, current_record
from shards.reader import expand_urls

log = logging.getLogger("pipeline.reduce")


@dataclass(frozen=True)
class ReduceSpec:
    """The summary of one stage's sidecars."""
    stage: str = param(help="stage folder holding sidecars/ (after every assign task)", result=False)
    data: str | None = param(None, "shard spec, to draw the cluster grid PNG")
    batch_sizes: tuple[int, ...] = param((64, 256, 1024), "batch sizes to count the groups smaller than")
    grid_per_cluster: int = param(8, "sample images per cluster in the grid")
    global_batch: int | None = param(None, "the global batch of the stage trained on these labels: its shares of "
                                     "samples in pure steps, mixed steps and fallback are measured")
    fallback_below: float | None = param(None, "groups below this many samples fall back in that training "
                                         "(default: one global batch)")
    max_fallback: float | None = param(None, "refuse the labels when a larger share of samples falls back "
                                       "(the training's max_fallback)")

    def problems(self) -> list[str]:
        return ([f"grid_per_cluster: must be >= 1, got {self.grid_per_cluster}"] if self.grid_per_cluster < 1 else []) + \
            [f"batch_sizes: must be >= 1, got {b}" for b in self.batch_sizes if b < 1] + \
            ([f"global_batch: must be >= 1, got {self.global_batch}"]
             if self.global_batch is not None and self.global_batch < 1 else [])


def is_done(spec: ReduceSpec) -> bool:
    """The summary was made with these parameters from the stage's current sidecars."""
    stage = StageDir(spec.stage)
    try:
        stats = json.loads(stage.assign_stats.read_text())
        return stats.get("record") == current_record(stage).to_json() and stats.get("spec_fp") == fingerprint(spec)
    except (UsageError, StaleSidecarError, OSError, ValueError):
        return False


def reduce(spec: ReduceSpec) -> dict:
    """Group sizes, cluster sizes and NMI over all samples, and the cluster grid PNG."""
    check(spec)
    stage = StageDir(spec.stage)
    data, batch_sizes, grid_per_cluster = spec.data, spec.batch_sizes, spec.grid_per_cluster
    stage.assign_stats.unlink(missing_ok=True)  # the record goes first, is written last
    record = current_record(stage)
    meta, stage_index = record.meta, record.stage
    groups: collections.Counter = collections.Counter()
    cluster_sizes = np.zeros(meta.k, np.int64)
    assignments, attributes = [], []
    words: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    key_cluster: dict[tuple[str, str], int] = {}  # (shard's file name, key): keys repeat across shards
    grid_shards: set[str] = set()  # the grid reads only these shards' samples
    for f in stage.embedding_files():
        path = stage.sidecar_of(f)
        if not path.exists():
            raise UsageError(f"{path}: missing; run every assign task before the reduce step")
        got = sidecar_meta(path)
        if got["centroids_fp"] != meta.centroids_fp or got["model_fp"] != meta.model_fp:
            raise StaleSidecarError(f"{path}: stale sidecar (other model or centroids); rerun assign")
        keys, clusters, labels = read_sidecar_columns(path)
        groups.update(labels.tolist())
        cluster_sizes += np.bincount(clusters, minlength=meta.k)
        z = read_embeddings(f, ("keys", "captions", "attributes"))
        if z["keys"].tolist() != keys:
            raise StaleSidecarError(f"{path}: keys differ from {f}; rerun assign")
        assignments.append(clusters)
        attributes += z["attributes"].tolist()
        for c, caption in zip(clusters.tolist(), z["captions"].tolist()):
            words[c].update(w for w in caption.lower().split() if w not in _STOPWORDS)
        if len(key_cluster) < 50 * meta.k * grid_per_cluster:
            key_cluster.update(zip(((f.stem, k) for k in keys), clusters.tolist()))
            grid_shards.add(f.stem)
    sizes = sorted(groups.values())
    summary = {
        "stage": stage_index, "ks": list(meta.ks), "samples": int(sum(sizes)), "groups": len(sizes),
        "smallest_group": sizes[0] if sizes else 0, "largest_group": sizes[-1] if sizes else 0,
        "groups_smaller_than": {str(b): sum(1 for s in sizes if s < b) for b in batch_sizes},
        "samples_in_groups_smaller_than": {str(b): int(sum(s for s in sizes if s < b)) for b in batch_sizes},
    }
    measured = None
    if spec.global_batch:
        measured = shares(dict(groups), meta.ks, spec.global_batch, spec.fallback_below)
        summary["batch_shares"] = {**measured.to_json(), "global_batch": spec.global_batch}
    write_json(stage.groups, {**summary, "sizes": {str(k): v for k, v in groups.items()}})
    if measured is not None:
        log.info("stage %d labels at global batch %d: %s", stage_index, spec.global_batch, measured.line())
        if spec.max_fallback is not None and measured.fallback > spec.max_fallback:
            raise UsageError(fallback_refusal(f"{stage.path} labels", measured, spec.global_batch, spec.max_fallback))
    top_words = {str(c): [w for w, _ in words[c].most_common(5)] for c in range(meta.k)}
    stats = {"stage": stage_index, "k": meta.k, "cluster_sizes": cluster_sizes.tolist(),
             "nmi": attribute_nmi(np.concatenate(assignments), attributes) if assignments else {},
             "purity": attribute_purity(np.concatenate(assignments), attributes) if assignments else {},
             "top_words": top_words, "groups": summary, "record": record.to_json(), "spec_fp": fingerprint(spec)}
    if data:
        all_urls = expand_urls(data)
        names = dict(zip(all_urls, shard_names(all_urls)))
        urls = [u for u in all_urls if names[u] in grid_shards]
        cluster_grid(urls, key_cluster, top_words, cluster_sizes, stage.grid, grid_per_cluster, names)
    index = write_index(stage, record, [f.stem for f in stage.embedding_files()])
    stats["index"] = index and {k: index[k] for k in ("samples", "skipped")}
    write_json(stage.assign_stats, stats)  # last: is_done reads it
    log.info("stage %d: %d samples in %d groups (smallest %d, largest %d); groups below batch sizes %s; NMI %s",
             stage_index, summary["samples"], summary["groups"], summary["smallest_group"],
             summary["largest_group"], summary["groups_smaller_than"], stats["nmi"])
    return stats


_STOPWORDS = {"a", "an", "the", "of", "on", "in", "photo", "some", "at", "and", "with", "background", "pointing"}


def cluster_grid(data: str | Sequence[str], key_cluster: dict[tuple[str, str], int], top_words: dict, sizes: np.ndarray,
                 path: Path, per_cluster: int, names: dict[str, str] | None = None) -> Path:
    """One row per cluster: its size, its top caption words and `per_cluster` sample images;
    `key_cluster` maps (shard file name, key) to a cluster, `names` each URL to its shard's
    file name (default: shard_names of the data)."""
    from PIL import Image, ImageDraw

    from shards.reader import ProblemLog, read_samples

    k = len(sizes)
    if names is None:
        urls = expand_urls(data)
        names = dict(zip(urls, shard_names(urls)))
    chosen: dict[int, list] = collections.defaultdict(list)
    for s in read_samples(data, ProblemLog(logger=None), captions=False):  # images only: image-only data too
        c = key_cluster.get((names.get(s["__url__"], ""), s["__key__"]))
        if c is not None and len(chosen[c]) < per_cluster:
            chosen[c].append(s["image"])
        if sum(len(v) for v in chosen.values()) >= k * per_cluster or len(key_cluster) == 0:
            break
    cell, label_w = 64, 260
    img = Image.new("RGB", (label_w + per_cluster * (cell + 2), k * (cell + 2)), "white")
    draw = ImageDraw.Draw(img)
    for c in range(k):
        y = c * (cell + 2)
        draw.text((4, y + 4), f"cluster {c}  n={int(sizes[c])}", fill="black")
        draw.text((4, y + 22), ", ".join(top_words.get(str(c), [])[:5])[:40], fill="black")
        for j, im in enumerate(chosen.get(c, [])):
            img.paste(im.resize((cell, cell)), (label_w + j * (cell + 2), y))
    with atomic_output(path, "wb") as f:
        img.save(f, format="PNG")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    spec = from_args(ReduceSpec, parser(ReduceSpec, "python -m pipeline.reduce", __doc__).parse_args(argv))
    setup_logging()
    reduce(spec)
    return 0


if __name__ == "__main__":
    run_main(main, "python -m pipeline.reduce")
