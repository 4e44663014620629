"""Train one MCL stage: a CLIP model on streamed shards with the masked contrastive loss.

With `modality: image` the stage is the paper's unimodal one: an image-only model
(pipeline.image_model: timm or torchvision backbone, projection head) trained on two
augmented views of each image (pipeline.loader.views) with the masked NT-Xent loss
(pipeline.trainer.ntxent); captions are not read. Everything else (loaders, engines,
checkpoints, resume, dashboards) is the same.

    python -m pipeline.train --config FILE [key=value ...]
    torchrun --nproc-per-node 2 -m pipeline.train --config FILE engine=deepspeed

Runs alone, under torchrun (DDP; gloo on CPU, nccl on GPU), or under srun (one task per
GPU). Writes to the stage folder `out`:

    checkpoints/step_NNNNNNNN.pt     every `save_every` steps and at the end (atomic; the
                                     DeepSpeed engine writes a folder + a .json record)
    metrics.jsonl                    one line per step: loss, lr, samples/s, effective negatives;
                                     at log steps data wait share, samples/s per device, MFU
    model/                           the final model, a plain open_clip artifact
    done.json                        written last: the stage is complete

On Slurm's warning before the time limit (SIGUSR2) or SIGTERM every rank writes a
checkpoint of the step it is at before the job is requeued (pipeline.trainer.preemption).
A rerun resumes from the latest checkpoint exactly (step, optimiser, schedule, RNG and
each data worker's position and counters), so a run killed with SIGKILL and restarted ends
where an uninterrupted one does, with the same loader and data-problem counts; a finished
stage is skipped.

The loop here is built from the loader (pipeline.loader: `make_stream` gives the rank's
batches, `LoaderProgress` its counters) and the trainer's parts (pipeline.trainer: engine,
checkpoints, loss, metrics log, trackers, distributed setup, the config).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch

from pipeline import models
from pipeline.loader.batch import Batch
from pipeline.trainer.checkpoints import Checkpoints, Position
from pipeline.loader.build import make_stream, resolve_loader
from pipeline.loader.decode import blank_image
from pipeline.loader.images import DeviceNormalize, split_transform
from pipeline.loader.views import TwoViews
from pipeline.loader.labels import seed_of
from pipeline.loader.progress import LoaderProgress
from pipeline.loader.workers import start_batches
from pipeline.trainer.distributed import DistInfo, all_gather_object, barrier, cleanup, init_distributed, node_name
from pipeline.trainer.engine import Engine, create_engine
from pipeline.trainer.loss import MaskedClipLoss
from pipeline.trainer.ntxent import MaskedNTXentLoss
from pipeline.trainer.preemption import StopSignals
from pipeline.trainer.problem_rate import ProblemRate
from pipeline.stage import StageDir
from pipeline.trainer.config import TrainConfig, batching, load_train_config, recorded_batching, to_dict
from pipeline.trainer.log import MetricsLog, keep_records
from pipeline.trainer.throughput import Throughput, flops_per_sample, peak_tflops
from pipeline.trainer.trackers import Trackers, missing_packages, tracker_names
from common.cli import ArgumentParser, UsageError, run_main, setup_logging
from common.io import write_json
from shards.reader import expand_urls

log = logging.getLogger("pipeline.train")
# Keys of the config that change what is trained; others (logging, workers...) may differ on resume.
LOCAL_LOSS_ABOVE = 4096  # global batches above this should use the local loss (warned)
RESULT_KEYS = ("data", "modality", "views", "model",
               "pretrained", "quick_gelu", "lock_image", "lock_image_unlocked_groups", "lock_text",
               "lock_text_unlocked_layers", "seed", "batch_size", "augment", "train_num_samples", "epochs",
               "steps", "labels", "bucket", "bucket_cap", "fallback_min_batches", "missing_labels",
               "caption_dedup", "local_loss", "lr", "wd", "beta1", "beta2", "eps", "warmup", "lr_scheduler",
               "grad_clip")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


def _config_matches(record: dict, cfg: TrainConfig) -> bool:
    old = record.get("config", {})
    # a key a record lacks (written before it existed) had its default
    return all(old.get(k, _DEFAULTS.get(k)) == getattr(cfg, k) for k in RESULT_KEYS if k != "bucket") and \
        recorded_batching(record) == batching(cfg)


def conflict(cfg: TrainConfig) -> str | None:
    """Why the stage folder cannot take this config: it holds a finished training of another
    config (its outputs would be overwritten); None when it can."""
    done = StageDir(cfg.out).done
    if not done.is_file():
        return None
    record = json.loads(done.read_text())
    if _config_matches(record, cfg):
        return None
    if recorded_batching(record) != batching(cfg):
        return (f"{done}: this stage was trained with bucket={recorded_batching(record)}, the config asks for "
                f"bucket={batching(cfg)}; set train.bucket={recorded_batching(record)} to keep it, or remove "
                f"{done.parent} to train it again")
    return f"{done}: this stage was trained with another config; use another `out`"


def inputs(cfg: TrainConfig) -> dict:
    """Fingerprints of what the stage trains from besides its config: the sidecar record of
    the stage whose clusters label its batches, and the model folder it starts from."""
    from pipeline.artifacts import StaleSidecarError
    from pipeline.stage import SIDECAR_LABELS, current_record

    found = {}
    if cfg.labels.startswith(SIDECAR_LABELS):
        try:
            found["labels"] = current_record(StageDir.from_label_source(cfg.labels)).meta.to_json("").decode()
        except (UsageError, StaleSidecarError, OSError, ValueError):
            found["labels"] = None
    if cfg.pretrained and os.path.isdir(cfg.pretrained):
        try:
            found["init"] = models.model_fingerprint(cfg.pretrained, None, "both")
        except OSError:
            found["init"] = None
    return found


def _stale_inputs(record: dict, cfg: TrainConfig) -> bool:
    """A finished training of this config from other inputs (a record from before inputs
    were recorded is taken as it is)."""
    return "inputs" in record and record["inputs"] != inputs(cfg)


def is_done(cfg: TrainConfig) -> bool:
    """The stage folder holds a finished training of this config, from the current inputs
    (its label stage's clusters, its init model)."""
    done = StageDir(cfg.out).done
    if not done.is_file():
        return False
    record = json.loads(done.read_text())
    return _config_matches(record, cfg) and not _stale_inputs(record, cfg)


def train(cfg: TrainConfig) -> dict:
    """Train the stage described by `cfg` (or resume it); returns the done record."""
    out = Path(cfg.out)
    if conflict(cfg):
        raise UsageError(conflict(cfg))
    if is_done(cfg):
        record = json.loads(StageDir(out).done.read_text())
        log.info("%s: stage already trained (%d steps), skipped", out, record["steps"])
        return record
    urls = expand_urls(cfg.data)
    if models.is_image_only(cfg.model, cfg.pretrained) != (cfg.modality == "image"):
        kind = "an image-only" if cfg.modality == "clip" else "a CLIP"
        raise UsageError(f"model: {cfg.pretrained or cfg.model!r} is {kind} model; modality: {cfg.modality} "
                         f"needs {'an image-only' if cfg.modality == 'image' else 'a CLIP'} one")
    missing = missing_packages(cfg.report_to)
    if missing:
        raise UsageError(f"report_to: {', '.join(missing)} is not installed (pip install {' '.join(missing)}), "
                         f"or leave it out of report_to")
    info = init_distributed(cfg.dist_backend)
    try:
        return _train(cfg, info, urls, out)
    finally:
        cleanup(info)


def _set_aside(out: Path, info: DistInfo) -> None:
    """A finished training of this config from other inputs (the label stage clustered anew,
    the init stage trained anew) moves to OUT/superseded/<time>/: nothing is deleted, and
    the stage trains again from the start."""
    if info.is_main and StageDir(out).done.is_file():
        import time

        aside = out / "superseded" / time.strftime("%Y%m%d-%H%M%S")
        aside.mkdir(parents=True, exist_ok=True)
        for name in ("done.json", "model", "checkpoints", "metrics.jsonl", "loader_stats.jsonl"):
            if (out / name).exists():
                os.replace(out / name, aside / name)
        log.warning("%s: trained from other inputs than the current ones (labels or init model); "
                    "that training is kept in %s and the stage trains again", out, aside)
    barrier(info)


def _train(cfg: TrainConfig, info: DistInfo, urls: list[str], out: Path) -> dict:
    _set_aside(out, info)  # train() found it not done: a done record here is of other inputs
    current = inputs(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, pre_train, pre_val, tokenizer = models.create(
        cfg.model, cfg.pretrained, device=info.device, lock_image=cfg.lock_image,
        lock_image_unlocked_groups=cfg.lock_image_unlocked_groups, lock_text=cfg.lock_text,
        lock_text_unlocked_layers=cfg.lock_text_unlocked_layers, quick_gelu=cfg.quick_gelu)
    model_cfg = models.model_config(cfg.model, cfg.pretrained, cfg.quick_gelu)

    # the workers make uint8 images; the step normalises them on the device (pipeline.loader.images)
    if cfg.modality == "image":
        to_uint8 = TwoViews(cfg.views, model.image_size)
        normalize = DeviceNormalize(model.mean, model.std)
    else:
        to_uint8, normalize = split_transform(pre_train if cfg.augment else pre_val)
    normalize = normalize.to(info.device)
    cfg, _ = resolve_loader(cfg, tuple(blank_image(to_uint8).shape), tokenizer, info)
    stream, mode, num_samples, steps_per_epoch = make_stream(cfg, urls, info, to_uint8, tokenizer)
    total_steps = cfg.steps or cfg.epochs * steps_per_epoch
    hosts = all_gather_object(node_name(), info)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "train_config.json", to_dict(cfg))
        global_batch = cfg.batch_size * info.world_size
        log.info("%s: %d shards, %d samples/epoch, %d steps/epoch, %d steps, global batch %d, batches %s, %s%s",
                 out, len(urls), num_samples, steps_per_epoch, total_steps, global_batch, mode,
                 cfg.engine, f" ZeRO-{cfg.zero_stage}" if cfg.engine == "deepspeed" else "")
        if info.distributed:
            log.info("world size %d: %s", info.world_size, ", ".join(f"rank {r} on {h}" for r, h in enumerate(hosts)))
        if info.distributed and not cfg.local_loss and global_batch > LOCAL_LOSS_ABOVE:
            log.warning("global batch %d: the loss builds %d x %d logits and masks on every rank; "
                        "local_loss: true builds %d x %d (the same gradients with gather_with_grad)",
                        global_batch, global_batch, global_batch, cfg.batch_size, global_batch)

    engine = create_engine(model, cfg, info)
    from open_clip_train.scheduler import const_lr, cosine_lr
    schedule = (cosine_lr if cfg.lr_scheduler == "cosine" else const_lr)(engine.optimizer, cfg.lr, cfg.warmup,
                                                                         total_steps)
    loss_fn = (MaskedNTXentLoss if cfg.modality == "image" else MaskedClipLoss)(
        local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad, rank=info.rank, world_size=info.world_size)
    ckpts = Checkpoints(out / "checkpoints", engine, cfg, info)
    at = _resume(ckpts, cfg, info)
    if info.is_main:  # the epochs from the resumed one on write their loader lines again
        keep_records(out / "loader_stats.jsonl", lambda record: record["epoch"] < at.epoch)

    metrics = MetricsLog(out, at.step, total_steps, cfg.batch_size * info.world_size, cfg.log_every, info,
                         lambda: Trackers(tracker_names(cfg.report_to), out, at.step,
                                          {**to_dict(cfg), "world_size": info.world_size, "batching": mode},
                                          cfg.wandb_project, cfg.wandb_entity))
    throughput = _throughput(cfg, engine, normalize, to_uint8, tokenizer, info)
    step, epoch, data_problems, failed = at.step, at.epoch, dict(at.data_problems), True
    rate = ProblemRate(cfg.max_problem_rate, info)
    stop = StopSignals(info).__enter__()
    try:
        while step < total_steps or epoch == at.epoch:  # resumed at its last step: that epoch still reports
            start = at.workers if epoch == at.epoch else {}  # only a resumed epoch starts part-way
            loader = LoaderProgress(start, at.counters if epoch == at.epoch else None)
            rate.start_epoch(loader)
            if step < total_steps:
                stream.set_epoch(epoch, start)
                engine.model.train()
                throughput.epoch_start()
                for batch in throughput.timed(_batches(stream, cfg, epoch, info,
                                                       pad=mode == "slot" and info.distributed)):
                    loader.update(batch.info)
                    rate.add(batch)
                    lr = schedule(step)
                    loss = _step(engine, loss_fn, batch.to(info.device), cfg, normalize)
                    step += 1
                    throughput.step_done()
                    metrics.step(step, epoch, loss, lr, loss_fn.last_effective_negatives, engine.unwrap().logit_scale,
                                 _main_label(batch) if mode != "off" else None, throughput)
                    if step % cfg.log_every == 0 or step == total_steps:
                        rate.check()  # every rank alike: past max_problem_rate all stop with one line
                    saved = step % cfg.save_every == 0 or step == total_steps
                    if saved:
                        ckpts.save(step, epoch, loader.positions, loader.counters(), data_problems)
                    if step == total_steps:
                        break  # inside the epoch: the checkpoint knows where
                    if stop.agreed():  # a requeue is coming: this step is not redone
                        if not saved:
                            ckpts.save(step, epoch, loader.positions, loader.counters(), data_problems)
                        stop.leave(step)
            rate.end_epoch()
            stats = None
            if mode != "off":
                whole = step < total_steps or (mode in ("global", "stream")
                                               and sum(loader.positions.values()) == steps_per_epoch)
                stats = loader.report_stats(out, epoch, step, info, complete=whole)
            known = stream.index.skipped if mode == "global" else stream.meta["skipped"] if mode == "stream" else None
            problems = loader.report_problems(epoch, info, known)
            for kind, n in problems.items():
                data_problems[kind] = max(n, data_problems.get(kind, 0))
            metrics.epoch_end(step, stats, problems)
            epoch += 1
        failed = False
    finally:
        stop.__exit__()
        metrics.close(failed)

    record = {"steps": step, "final_loss": metrics.last.get("loss"), "model_dir": str(out / "model"),
              "architecture": cfg.model, "data_problems": data_problems, "config": to_dict(cfg), "batching": mode,
              "inputs": current, "throughput": throughput.summary()}
    if info.is_main:
        log.info("%s", throughput.describe())
        models.save_model(engine.unwrap(), cfg.model, model_cfg, out / "model")
        write_json(out / "done.json", record)
        log.info("%s: stage done, model in %s", out, out / "model")
    barrier(info)
    return record


def _resume(ckpts: Checkpoints, cfg: TrainConfig, info: DistInfo) -> Position:
    """Where the run starts: the latest checkpoint, if any, loaded into the engine with this
    rank's RNG state."""
    latest = ckpts.latest()
    if latest is None:
        return Position()
    state = ckpts.load(latest)
    if not _config_matches(state, cfg):
        raise UsageError(f"{latest}: checkpoint of another config; use another `out` or remove it")
    at = ckpts.restore(state)
    if info.is_main:
        log.info("resumed from %s at step %d (epoch %d)", latest, at.step, at.epoch)
    return at


def _batches(stream, cfg: TrainConfig, epoch: int, info: DistInfo, pad: bool) -> Iterator[Batch]:
    """This rank's batches of `epoch`. With `pad` (ranks that run out at different steps),
    padding batches follow until every rank has run out."""
    batches = start_batches(stream, cfg.workers, seed_of(cfg.seed, epoch), prefetch=cfg.prefetch_factor)
    while True:
        batch = next(batches, None)
        if pad:
            if not any_rank(batch is not None, info):
                return
            if batch is None:
                batch = stream.padding()
        elif batch is None:
            return
        yield batch


def _main_label(batch: Batch) -> int | None:
    """The pseudo-label most of the batch's valid entries carry (a pure batch's only one)."""
    labels = batch.labels[batch.valid]
    return int(labels.mode().values) if len(labels) else None


def any_rank(flag: bool, info: DistInfo) -> bool:
    t = torch.tensor([1 if flag else 0], device=info.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _step(engine: Engine, loss_fn: MaskedClipLoss | MaskedNTXentLoss, batch: Batch, cfg: TrainConfig,
          normalize: DeviceNormalize) -> torch.Tensor:
    """One optimisation step on `batch` (on the device, its images uint8: [B, 3, H, W], or
    [B, 2, 3, H, W] two views for an image-only model, whose (a, b, scale) are its views'
    projections); returns its loss."""
    images = normalize(batch.images)
    with engine.autocast():
        image_f, text_f, scale = _features(engine.model(images, batch.tokens))
        loss = loss_fn(image_f, text_f, scale, batch.labels if cfg.labels != "none" else None,
                       batch.caption_ids if cfg.caption_dedup else None, batch.valid)
    engine.backward(loss)
    engine.step()
    return loss


def _throughput(cfg: TrainConfig, engine: Engine, normalize: DeviceNormalize, to_uint8, tokenizer,
                info: DistInfo) -> Throughput:
    """The stage's throughput meter; with a known peak (`peak_tflops`, or the GPU's) the main
    rank counts the model's FLOPs per sample once, for the MFU estimate."""
    peak = peak_tflops(cfg.peak_tflops, info.device)
    flops = None
    if peak and info.is_main:
        image = normalize(blank_image(to_uint8).unsqueeze(0).to(info.device))
        try:
            flops = flops_per_sample(engine.unwrap(), image, tokenizer(["a photo"]).to(info.device))
        except Exception as exc:  # noqa: BLE001 - an estimate: the run goes on without it
            log.warning("could not count the model's FLOPs (%s): no MFU estimate", exc)
    return Throughput(cfg.batch_size, flops, peak)


def _features(out):
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"]
    return out[0], out[1], out[2]


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m pipeline.train", description=__doc__)
    p.add_argument("--config", help="YAML file of TrainConfig keys (or a `train:` section)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. steps=200 lr=1e-3")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = p.parse_args(argv)
    setup_logging()
    try:
        cfg = load_train_config(args.config, args.overrides)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    if not models.known_architecture(cfg.model) and not (cfg.pretrained and os.path.isdir(cfg.pretrained)):
        raise UsageError(f"model: unknown architecture {cfg.model!r}")
    train(cfg)
    return 0


if __name__ == "__main__":
    run_main(main, "python -m pipeline.train")
