"""The one builder training calls: the rank's batch stream for a stage's `labels` and `bucket`.

    global   pipeline.loader.global_stream: every step's batches on all ranks from one group
    slot     pipeline.loader.slot with per-slot bucketing (pipeline.loader.buckets)
    off      pipeline.loader.slot, plain batches (stage 1, or labels from json for tests)
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np

from common.cli import UsageError
from pipeline.artifacts import array_fingerprint
from pipeline.loader.global_stream import GlobalBatchStream, load_index
from pipeline.loader.groups import label_table
from pipeline.loader.stage_index import group_sizes
from pipeline.loader.labels import JsonLabeler, SidecarLabeler, no_labels
from pipeline.loader.memory import LoaderPlan, auto_workers, batch_bytes, plan_loader
from pipeline.loader.slot import TrainStream, epoch_plan
from pipeline.stage import SIDECAR_LABELS, StageDir
from pipeline.trainer.config import TrainConfig, batching
from pipeline.trainer.distributed import DistInfo, all_gather_object
from shards.reader import shard_sizes

log = logging.getLogger("pipeline.train")  # its lines are the training's


def resolve_loader(cfg: TrainConfig, image_shape: tuple[int, ...], tokenizer=None, info: DistInfo | None = None,
                   cpus: int | None = None) -> tuple[TrainConfig, LoaderPlan]:
    """(`cfg` with `workers` and `prefetch_factor` set, the plan they come from) for batches of
    `cfg.batch_size` uint8 images of `image_shape` (C, H, W): automatic values where the config
    leaves them None (pipeline.loader.memory), its own values where it sets them. The main
    rank logs the plan in one line."""
    per_batch = batch_bytes(cfg.batch_size, image_shape, int(getattr(tokenizer, "context_length", None) or 77))
    plan = plan_loader(cfg.workers, cfg.prefetch_factor, cfg.loader_memory_gb, per_batch, cpus)
    if info is None or info.is_main:
        log.info("%s", plan.describe())
    return dataclasses.replace(cfg, workers=plan.workers, prefetch_factor=plan.prefetch), plan


def needs_captions(cfg: TrainConfig) -> bool:
    """Whether a training sample needs a caption: not for image-only training."""
    return cfg.modality != "image"


def make_stream(cfg: TrainConfig, urls: list[str], info: DistInfo, transform, tokenizer):
    """(the rank's batch stream, its batching mode: global | slot | off, samples per epoch,
    steps per epoch) for the config's `labels` and `bucket`."""
    mode = batching(cfg)
    if cfg.workers is None:  # not resolved by the caller (resolve_loader): the automatic count
        cfg = dataclasses.replace(cfg, workers=auto_workers())
    if mode == "global":
        stage = StageDir.from_label_source(cfg.labels)
        index = load_index(stage, urls)
        seen = all_gather_object((len(index), array_fingerprint(index.label), array_fingerprint(index.offset)), info)
        if len(set(seen)) > 1:  # a lagging file system listing or a sidecar rewritten meanwhile: plans would differ
            raise UsageError(f"{stage.path}: the ranks read different sidecars ({len(set(seen))} versions: "
                             f"sample counts {sorted({s[0] for s in seen})}); is assign still running?")
        stream = GlobalBatchStream(index, transform, tokenizer, cfg.batch_size, cfg.seed,
                                   info.rank, info.world_size, cfg.fallback_min_batches, captions=needs_captions(cfg))
        check_fallback(cfg, stage, int(stream.fell.sum()), len(stream.index), len(np.unique(stream.index.label)),
                       stream.global_batch)
        if info.is_main:
            fell = int(stream.fell.sum())
            log.info("%s: %d pseudo-labels, %d samples; %d samples in groups below %d fall back to a parent label; "
                     "%d samples the embed job skipped", stage.path, len(np.unique(stream.index.label)),
                     len(stream.index), fell, int(cfg.fallback_min_batches * stream.global_batch),
                     sum(stream.index.skipped.values()))
        return stream, mode, len(stream.index), stream.steps_per_epoch()
    if mode == "stream":
        return regrouped_stream(cfg, info, transform, tokenizer)
    labeler = make_labeler(cfg, urls, info)
    sizes = None if cfg.train_num_samples else shard_sizes(urls)
    num_samples = cfg.train_num_samples or sum(sizes)
    worker_batches, steps_per_epoch = epoch_plan(num_samples, cfg.batch_size, info.world_size, cfg.workers)
    stream = TrainStream(urls, transform, tokenizer, cfg.batch_size, worker_batches, cfg.seed, info.rank,
                         info.world_size, cfg.shuffle_buffer, labeler,
                         bucket_cap=(cfg.bucket_cap or 16 * cfg.batch_size) if mode == "slot" else None, sizes=sizes,
                         captions=needs_captions(cfg))
    return stream, mode, num_samples, steps_per_epoch


def regrouped_stream(cfg: TrainConfig, info: DistInfo, transform, tokenizer):
    """The `bucket=stream` loader over the regroup step's files, checked against the stage
    whose labels it was laid out by."""
    from pipeline.loader.regrouped import RegroupedStream
    from pipeline.stage import current_record

    stage = StageDir.from_label_source(cfg.labels)
    stream = RegroupedStream(cfg.regrouped, transform, tokenizer, cfg.batch_size, cfg.seed, info.rank,
                             info.world_size, captions=needs_captions(cfg))
    if stream.meta["record"] != current_record(stage).to_json():
        raise UsageError(f"{cfg.regrouped}: regrouped from other labels than {stage.path}'s current ones; "
                         "run the regroup step again")
    meta = stream.meta
    check_fallback(cfg, stage, meta["fallback_samples"], meta["samples"], meta["stats"]["chunks"],
                   stream.global_batch)
    if info.is_main:
        log.info("%s: %d samples regrouped in %d files per rank (%d pure steps, %d mixed); %d samples fall back "
                 "to a parent label; %d samples earlier jobs skipped", cfg.regrouped, meta["samples"],
                 len(meta["files"]), meta["stats"]["pure_steps"], meta["stats"]["mixed_steps"],
                 meta["fallback_samples"], sum(meta["skipped"].values()))
    return stream, "stream", stream.samples, stream.steps_per_epoch()


def check_fallback(cfg: TrainConfig, stage: StageDir, fell: int, samples: int, groups: int, global_batch: int) -> None:
    """Refuse (UsageError, one line) labels that send more than `max_fallback` of the samples
    to a coarser label: that part of the stage would train as the stage before."""
    from pipeline.group_sizing import Shares, fallback_refusal

    if samples and fell / samples > cfg.max_fallback:
        found = Shares(samples, groups, 0.0, 0.0, fell / samples)
        raise UsageError(fallback_refusal(f"{stage.path} labels", found, global_batch, cfg.max_fallback))


def make_labeler(cfg: TrainConfig, urls: list[str], info: DistInfo):
    """The labeler of the streamed loader for the config's `labels`."""
    if cfg.labels.startswith("json:"):
        return JsonLabeler(cfg.labels[5:])
    if not cfg.labels.startswith(SIDECAR_LABELS):
        return no_labels
    from pipeline.artifacts import read_sidecar_columns
    from pipeline.stage import labels_for_training

    stage = StageDir.from_label_source(cfg.labels)
    expect = labels_for_training(stage, urls)
    paths = dict(zip(urls, stage.sidecar_paths(urls)))
    sizes = group_sizes(stage)  # the reduce step's count, else every sidecar's
    if sizes is None:
        sizes = {}
        for path in paths.values():
            for lab in read_sidecar_columns(path)[2].tolist():
                sizes[lab] = sizes.get(lab, 0) + 1
    workers = auto_workers() if cfg.workers is None else cfg.workers
    min_size = cfg.fallback_min_batches * cfg.batch_size * info.world_size * max(1, workers)
    table = label_table(sizes, expect.ks, min_size)
    fell = sum(n for lab, n in sizes.items() if table[lab][2])
    check_fallback(cfg, stage, fell, sum(sizes.values()), len(sizes), cfg.batch_size * info.world_size)
    if info.is_main:
        log.info("%s: %d pseudo-labels, %d samples; %d samples in groups below %d fall back to a parent label",
                 stage.path, len(sizes), sum(sizes.values()), fell, int(min_size))
    return SidecarLabeler(stage, expect, table, cfg.missing_labels, paths=paths)
