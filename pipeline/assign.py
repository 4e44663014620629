"""Assign every sample to its nearest centroid and write the per-shard sidecars.

    python -m pipeline.assign --stage runs/r/stage2 --stage-index 2 --parent runs/r/stage1 \\
        [--task I --tasks N]

Task I of N takes every N-th embedding file of the stage and writes
`STAGE/sidecars/<shard>.parquet` (format: pipeline.artifacts): each sample's cluster id
c_s and its pseudo-label, the packed combination of all its cluster ids so far, read from
the parent stage's sidecar of the same shard by key. The stage, K, and fingerprints of the
model, the centroids and the parent's centroids sit in the file, and once in the stage
record `STAGE/sidecars/_stage.json` (pipeline.stage), so a stale or foreign sidecar is
refused by readers; a rerun skips sidecars that are current.

After every task, `pipeline.reduce` summarises the stage's sidecars.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from common.cli import UsageError, run_main, setup_logging
from common.spec import from_args, param, parser
from pipeline import split_clusters
from pipeline.artifacts import (StaleSidecarError, check_sidecar, read_embeddings, read_sidecar, read_skipped,
                                write_sidecar)
from pipeline.stage import StageDir, check_sidecars, expected_record, read_record, write_record

log = logging.getLogger("pipeline.assign")


def load_centroids(stage: StageDir) -> np.ndarray:
    if not stage.centroids.exists():
        raise UsageError(f"{stage.centroids}: no centroids; run pipeline.cluster first")
    return np.load(stage.centroids)


@dataclass(frozen=True)
class AssignSpec:
    """The sidecars of one stage (one task of an array)."""
    stage: str = param(help="stage folder holding embeddings/ and clusters/", result=False)
    stage_index: int = param(help="this stage's number s")
    parent: str | None = param(None, "the previous stage's folder (its sidecars give c_1..c_{s-1})")
    task: int = param(0, "this task's index", result=False, env="SLURM_ARRAY_TASK_ID")
    tasks: int = param(1, "number of tasks", result=False, env="SLURM_ARRAY_TASK_COUNT")


def is_done(spec: AssignSpec) -> bool:
    """The stage record is current and every embedded shard's sidecar (all tasks') carries it."""
    stage = StageDir(spec.stage)
    try:
        expect = expected_record(stage, spec.stage_index, StageDir(spec.parent) if spec.parent else None)
        if read_record(stage) != expect:
            return False
        files = stage.embedding_files()
        check_sidecars(stage, [f.stem for f in files], expect.meta, paths=[stage.sidecar_of(f) for f in files])
        return True
    except (UsageError, StaleSidecarError, OSError, ValueError):
        return False


def assign(spec: AssignSpec) -> list[Path]:
    """Write this task's sidecars (and the stage record); returns their paths."""
    stage = StageDir(spec.stage)
    parent_stage = StageDir(spec.parent) if spec.parent else None
    stage_index, task, tasks = spec.stage_index, spec.task, spec.tasks
    if not 0 <= task < tasks:
        raise UsageError(f"--task must be in [0, {tasks}), got {task}")
    record = expected_record(stage, stage_index, parent_stage)
    meta = record.meta
    parent_meta = read_record(parent_stage).meta if parent_stage else None
    centroids = load_centroids(stage).astype(np.float32)
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    children = split_clusters.load(stage.children) if stage.children.is_file() else None
    write_record(stage, record)
    files = stage.embedding_files()[task::tasks]
    out, written = [], 0
    for f in files:
        path = stage.sidecar_of(f)
        out.append(path)
        for leftover in path.parent.glob(f".{path.name}.*.tmp"):  # a write cut short by a kill
            leftover.unlink(missing_ok=True)  # only this task writes this shard's sidecar
        if path.exists():
            try:
                check_sidecar(path, meta)
                continue  # current
            except Exception:  # noqa: BLE001 - stale, or a file cut short by a kill: rewrite it
                pass
        z = read_embeddings(f, ("embeddings", "keys", "model_fp", "spans"))
        if str(z["model_fp"]) != meta.model_fp:
            raise StaleSidecarError(f"{f}: embedded by another model than the one {stage.cluster_stats} "
                                    "clustered; rerun pipeline.cluster")
        keys = z["keys"].tolist()
        parents = np.zeros(len(keys), np.int64)
        if parent_stage is not None:
            parent_path = parent_stage.sidecar_of(f)
            if not parent_path.exists():
                raise UsageError(f"{parent_path}: missing parent sidecar for shard {f.stem}")
            parent_labels = read_sidecar(parent_path, parent_meta)
            missing = [k for k in keys if k not in parent_labels]
            if missing:
                raise UsageError(f"{parent_path}: no entry for key {missing[0]} ({len(missing)} keys missing)")
            parents = np.array([parent_labels[k] for k in keys], dtype=np.int64)
        x = np.ascontiguousarray(z["embeddings"], dtype=np.float32)
        if not len(keys):
            clusters = np.zeros(0, np.int64)
        elif children is not None:
            clusters = split_clusters.assign(x, parents, centroids, *children)
        else:
            clusters = index.search(x, 1)[1][:, 0].astype(np.int64)
        labels = parents * meta.k + clusters if parent_stage is not None else clusters.copy()
        write_sidecar(path, keys, clusters, labels, meta, skipped=read_skipped(f), spans=z["spans"])
        written += 1
    log.info("task %d of %d: %d sidecars written, %d current", task, tasks, written, len(files) - written)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    spec = from_args(AssignSpec, parser(AssignSpec, "python -m pipeline.assign", __doc__).parse_args(argv))
    setup_logging()
    assign(spec)
    return 0


if __name__ == "__main__":
    run_main(main, "python -m pipeline.assign")
