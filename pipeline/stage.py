"""The stage contract: where each job of a stage writes, and who the stage is.

A run folder (`RunDir`) holds one folder per stage, the merged model and the evaluations:

    <run>/stage<s>/        one StageDir per stage (stage0: the pretrained model, fine-tune mode)
    <run>/merged.pt        pipeline.merge (its record: merged.pt.json)
    <run>/eval/            eval.suite: the MMVP-VLM, probe and zero-shot outputs, done.json
    <run>/run_config.json, launch_state.json, logs/, .launch.lock     launch's own

One stage folder holds everything the jobs of stage s write (formats: pipeline.artifacts):

    stage<s>/train_config.json, metrics.jsonl, loader_stats.jsonl, checkpoints/   pipeline.train
    stage<s>/model/                       the trained model (stage 0: the pretrained    pipeline.train
                                          one and its saved.json)                      pipeline.save
    stage<s>/done.json                    written last by training                     pipeline.train
    stage<s>/embeddings/<shard>.npz       one per input shard                          pipeline.embed
    stage<s>/clusters/centroids.npy, stats.json                                         pipeline.cluster
    stage<s>/sidecars/<shard>.parquet     one per input shard                          pipeline.assign
    stage<s>/sidecars/_stage.json         the stage record (below)                     pipeline.assign
    stage<s>/sidecars/_groups.json, clusters/assign_stats.json, clusters/grid.png      pipeline.reduce

The stage record is written once by assign: the stage's index, its parent stage folder and
the full metadata every sidecar of the stage carries (`SidecarMeta`: stage, K, the Ks of
all stages so far, the fingerprints of the embedding model, of the centroids and of the
parent's centroids). Readers (training's labels, the next stage's assign, launch) take the
stage's identity from the record and check each sidecar's footer against it; the record
itself is checked against the stage's current centroids and its parent's record, which
costs one small file each, so a stale record is refused like a stale sidecar.

Each job's "is it done?" is `is_done(spec)` next to the job (pipeline.save, train, embed,
cluster, assign, reduce, merge; eval.suite): its outputs exist and carry the fingerprint of
its spec (common.spec) and of its inputs; launch builds its plan from them. Train, embed,
cluster and assign apply the same test themselves when run and skip what is done (assign
per sidecar); save, reduce, merge and eval redo their work when run by hand.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.cli import UsageError
from common.io import write_json
from pipeline.artifacts import (SidecarMeta, StaleSidecarError, array_fingerprint, check_sidecar, file_fingerprint,
                                shard_names, shard_stem)

SIDECAR_LABELS = "sidecars:"  # TrainConfig.labels of a stage trained on another stage's sidecars
MAX_LABEL = 2 ** 56 - 1  # the loaders keep a coarse group's level in the bits above (pipeline.loader.groups)


@dataclass(frozen=True)
class _Folder:
    path: Path

    def __init__(self, path: str | os.PathLike):
        object.__setattr__(self, "path", Path(path))

    def __fspath__(self) -> str:
        return str(self.path)


class StageDir(_Folder):
    """The paths of one stage folder."""

    # training
    @property
    def done(self) -> Path:
        return self.path / "done.json"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def train_config(self) -> Path:
        return self.path / "train_config.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def loader_stats(self) -> Path:
        return self.path / "loader_stats.jsonl"

    # embedding
    @property
    def embeddings_dir(self) -> Path:
        return self.path / "embeddings"

    def embeddings(self, url: str) -> Path:
        """The embeddings of one shard named by its bare stem (a data set whose stems are
        unique); a data set's files: `embedding_paths`."""
        return self.embeddings_dir / f"{shard_stem(url)}.npz"

    def embedding_paths(self, urls) -> list[Path]:
        """The embeddings file of each shard of a data set (names: pipeline.artifacts.shard_names)."""
        return [self.embeddings_dir / f"{name}.npz" for name in shard_names(urls)]

    def embedding_files(self) -> list[Path]:
        files = sorted(self.embeddings_dir.glob("*.npz"))
        if not files:
            raise UsageError(f"{self.embeddings_dir}: no embeddings; run pipeline.embed first")
        return files

    # clustering
    @property
    def clusters_dir(self) -> Path:
        return self.path / "clusters"

    @property
    def centroids(self) -> Path:
        return self.clusters_dir / "centroids.npy"

    @property
    def cluster_stats(self) -> Path:
        return self.clusters_dir / "stats.json"

    @property
    def children(self) -> Path:
        """The split clustering's parent, child and offset of each centroid (pipeline.split_clusters)."""
        return self.clusters_dir / "children.npz"

    # assignment
    @property
    def sidecars_dir(self) -> Path:
        return self.path / "sidecars"

    def sidecar(self, url_or_stem: str) -> Path:
        """The sidecar of one shard named by its bare stem (a data set whose stems are unique);
        a data set's sidecars: `sidecar_paths`; the one of an embeddings file: `sidecar_of`."""
        return self.sidecars_dir / f"{shard_stem(url_or_stem)}.parquet"

    def sidecar_paths(self, urls) -> list[Path]:
        """The sidecar of each shard of a data set (names: pipeline.artifacts.shard_names)."""
        return [self.sidecars_dir / f"{name}.parquet" for name in shard_names(urls)]

    def sidecar_of(self, embeddings: Path) -> Path:
        """The sidecar (of this stage) of the shard an embeddings file was made from."""
        return self.sidecars_dir / f"{Path(embeddings).stem}.parquet"

    @property
    def record(self) -> Path:
        return self.sidecars_dir / "_stage.json"

    @property
    def groups(self) -> Path:
        return self.sidecars_dir / "_groups.json"

    @property
    def assign_stats(self) -> Path:
        return self.clusters_dir / "assign_stats.json"

    @property
    def grid(self) -> Path:
        return self.clusters_dir / "grid.png"

    @property
    def label_source(self) -> str:
        """The TrainConfig.labels value that trains a stage on this stage's sidecars."""
        return f"{SIDECAR_LABELS}{self.path}"

    @classmethod
    def from_label_source(cls, labels: str) -> "StageDir":
        if not labels.startswith(SIDECAR_LABELS):
            raise ValueError(f"labels {labels!r} do not name a stage's sidecars")
        return cls(labels[len(SIDECAR_LABELS):])


class RunDir(_Folder):
    """The paths of one run folder."""

    def stage(self, number: int) -> StageDir:
        return StageDir(self.path / f"stage{number}")

    @property
    def merged(self) -> Path:
        return self.path / "merged.pt"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    @property
    def config(self) -> Path:
        return self.path / "run_config.json"

    @property
    def state(self) -> Path:
        return self.path / "launch_state.json"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def lock(self) -> Path:
        return self.path / ".launch.lock"


@dataclass(frozen=True)
class StageRecord:
    """sidecars/_stage.json: the stage's index, parent folder and its sidecars' metadata."""
    stage: int
    parent: Path | None
    meta: SidecarMeta

    def to_json(self) -> dict:
        return {"stage": self.stage, "parent": str(self.parent or ""), "meta": json.loads(self.meta.to_json(""))}

    @classmethod
    def from_json(cls, raw: dict) -> "StageRecord":
        m = raw["meta"]
        meta = SidecarMeta(stage=int(m["stage"]), k=int(m["k"]), ks=tuple(m["ks"]), model_fp=m["model_fp"],
                           centroids_fp=m["centroids_fp"], parent_fp=m["parent_fp"])
        return cls(int(raw["stage"]), Path(raw["parent"]) if raw.get("parent") else None, meta)


def read_record(stage: StageDir) -> StageRecord:
    """The stage record as written (UsageError when assign has not run)."""
    if not stage.record.is_file():
        raise UsageError(f"{stage.record}: missing; the assign step of {stage.path} has not run")
    try:
        return StageRecord.from_json(json.loads(stage.record.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise StaleSidecarError(f"{stage.record}: not a stage record of this version ({exc}); rerun assign") from exc


def write_record(stage: StageDir, record: StageRecord) -> None:
    write_json(stage.record, record.to_json(), if_changed=True)


def expected_record(stage: StageDir, index: int, parent: StageDir | None) -> StageRecord:
    """The record the stage's sidecars must carry now: from its centroids, the model its
    clustering recorded, and the parent's record (no embedding file is opened)."""
    if not stage.centroids.is_file() or not stage.cluster_stats.is_file():
        raise UsageError(f"{stage.centroids}: no centroids; run pipeline.cluster first")
    centroids = np.load(stage.centroids)
    stats = json.loads(stage.cluster_stats.read_text())
    model_fp = stats.get("params", {}).get("model_fp")
    if not model_fp:
        raise StaleSidecarError(f"{stage.cluster_stats}: records no embedding model; rerun pipeline.cluster")
    parent_meta = current_record(parent).meta if parent is not None else None
    k = int(stats["k"]) if stats.get("mode") == "split" else int(centroids.shape[0])
    ks = (parent_meta.ks if parent_meta else ()) + (k,)
    if np.prod([float(x) for x in ks]) > MAX_LABEL:
        raise UsageError(f"pseudo-labels of K = {ks} do not fit in 56 bits (the product of the Ks must stay below 2^56)")
    centroids_fp = array_fingerprint(centroids)
    if stats.get("mode") == "split":  # the offsets and parents decide the assignment too
        centroids_fp = array_fingerprint(np.frombuffer((centroids_fp + file_fingerprint(stage.children)).encode(),
                                                       np.uint8))
    meta = SidecarMeta(stage=index, k=k, ks=ks, model_fp=model_fp, centroids_fp=centroids_fp,
                       parent_fp=parent_meta.centroids_fp if parent_meta else "")
    return StageRecord(index, parent.path if parent is not None else None, meta)


def current_record(stage: StageDir) -> StageRecord:
    """The stage record, refused (StaleSidecarError) when the stage's centroids or its
    parent's record have changed since assign wrote it."""
    record = read_record(stage)
    expect = expected_record(stage, record.stage, StageDir(record.parent) if record.parent else None)
    if expect.meta != record.meta:
        raise StaleSidecarError(f"{stage.record}: stale stage record (the centroids or the parent stage changed "
                                f"since assign ran); rerun the assign step of {stage.path}")
    return record


def labels_for_training(stage: StageDir, urls) -> SidecarMeta:
    """The metadata of a stage's sidecars for a training that reads them as labels, after
    checking the record is current and every shard's sidecar carries it: stale or foreign
    sidecars are refused (UsageError, one line) before training starts."""
    try:
        meta = current_record(stage).meta
        check_sidecars(stage, urls, meta)
    except StaleSidecarError as exc:
        raise UsageError(str(exc)) from exc
    return meta


def check_sidecars(stage: StageDir, urls, meta: SidecarMeta, paths=None) -> None:
    """Every shard's sidecar (`paths`, default the data set's `sidecar_paths`) exists and
    carries `meta` (footers only); UsageError or StaleSidecarError naming the first that does not."""
    urls = list(urls)
    for url, path in zip(urls, stage.sidecar_paths(urls) if paths is None else paths):
        if not path.exists():
            raise UsageError(f"{path}: no sidecar for shard {url}; run the assign step of {stage.path}")
        check_sidecar(path, meta)
