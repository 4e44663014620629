"""Train one MCL stage: a CLIP model on streamed shards with the masked contrastive loss.

    python -m pipeline.train --config FILE [key=value ...]
    torchrun --nproc-per-node 2 -m pipeline.train --config FILE engine=deepspeed

Runs alone, under torchrun (DDP; gloo on CPU, nccl on GPU), or under srun (one task per
GPU). Writes to the stage folder `out`:

    checkpoints/step_NNNNNNNN.pt     every `save_every` steps and at the end (atomic; the
                                     DeepSpeed engine writes a folder + a .json record)
    metrics.jsonl                    one line per step: loss, lr, samples/s, effective negatives
    model/                           the final model, a plain open_clip artifact
    done.json                        written last: the stage is complete

A rerun resumes from the latest checkpoint exactly (step, optimiser, schedule, RNG and
each data worker's position), so a run killed with SIGKILL and restarted ends where an
uninterrupted one does; a finished stage is skipped.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch

from pipeline import models
from pipeline.buckets import BucketStats
from pipeline.data import (BatchInfo, SidecarLabeler, TrainStream, _seed, epoch_plan, JsonLabeler, make_loader,
                           no_labels, sidecar_label_table)
from pipeline.distributed import DistInfo, all_gather_object, barrier, cleanup, init_distributed
from pipeline.loss import MaskedClipLoss
from pipeline.train_config import TrainConfig, load_train_config, to_dict
from common.cli import ArgumentParser, UsageError, run_main, setup_logging
from common.io import atomic_output, atomic_path, write_json
from shards.reader import PROBLEM_KINDS, expand_urls, local_sibling, shard_basename

log = logging.getLogger("pipeline.train")
# Keys of the config that change what is trained; others (logging, workers...) may differ on resume.
RESULT_KEYS = ("data", "model", "pretrained", "lock_image", "lock_image_unlocked_groups", "lock_text",
               "lock_text_unlocked_layers", "seed", "batch_size", "augment", "train_num_samples", "epochs",
               "steps", "labels", "bucket", "bucket_cap", "fallback_min_batches", "missing_labels",
               "caption_dedup", "local_loss", "lr", "wd", "beta1", "beta2", "eps", "warmup", "lr_scheduler",
               "grad_clip")


def count_samples(urls: Sequence[str]) -> int:
    """Samples in the shards, from the sizes.json beside them (as open_clip reads it)."""
    total, cache = 0, {}
    for url in urls:
        sizes_path = local_sibling(url, ".tar")
        sizes_file = sizes_path.parent / "sizes.json" if sizes_path is not None else None
        if sizes_file is None or not sizes_file.exists():
            raise UsageError(f"{url}: no sizes.json beside the shards; run `python -m shards.validate` "
                             "or set train_num_samples")
        if sizes_file not in cache:
            cache[sizes_file] = json.loads(sizes_file.read_text())
        name = shard_basename(url)
        if name not in cache[sizes_file]:
            raise UsageError(f"{sizes_file}: has no entry for {name}; rerun shards.validate")
        total += int(cache[sizes_file][name])
    return total


def param_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    """open_clip's split: no weight decay on gains, biases, norms and the logit scale."""
    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": wd}]


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


class Checkpoints:
    """Atomic checkpoints in `folder`; the DeepSpeed engine saves its own files plus a record."""

    def __init__(self, folder: Path, deepspeed: bool, keep: int):
        self.folder, self.deepspeed, self.keep = folder, deepspeed, keep

    def _records(self) -> list[Path]:
        pattern = "step_*.json" if self.deepspeed else "step_*.pt"
        return sorted(self.folder.glob(pattern))

    def latest(self) -> Path | None:
        records = self._records()
        return records[-1] if records else None

    def save(self, step: int, state: dict, model, optimizer, info: DistInfo) -> None:
        tag = f"step_{step:08d}"
        if self.deepspeed:
            model.save_checkpoint(str(self.folder), tag=tag, client_state={}, save_latest=False)
            barrier(info)
            if info.is_main:
                with atomic_path(self.folder / f"{tag}.state.pt") as tmp:
                    torch.save(state, tmp)
                write_json(self.folder / f"{tag}.json", {"step": step, "tag": tag})
        elif info.is_main:
            state = {**state, "state_dict": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict()}
            with atomic_path(self.folder / f"{tag}.pt") as tmp:
                torch.save(state, tmp)
        barrier(info)
        if info.is_main:
            for old in self._records()[: -self.keep]:
                old.unlink(missing_ok=True)
                if self.deepspeed:
                    (old.parent / f"{old.stem}.state.pt").unlink(missing_ok=True)
                    shutil.rmtree(old.parent / old.stem, ignore_errors=True)

    def load(self, record: Path, model, optimizer) -> dict:
        if self.deepspeed:
            model.load_checkpoint(str(self.folder), tag=record.stem, load_module_strict=True,
                                  load_optimizer_states=True, load_lr_scheduler_states=False)
            return torch.load(record.parent / f"{record.stem}.state.pt", map_location="cpu", weights_only=True)
        state = torch.load(record, map_location="cpu", weights_only=True)
        _unwrap(model).load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        return state


class MetricsLog:
    """metrics.jsonl (rank 0), trimmed to the resumed step, plus TensorBoard when installed."""

    def __init__(self, out: Path, resume_step: int, info: DistInfo, tensorboard: bool):
        self.path, self.enabled = out / "metrics.jsonl", info.is_main
        self.tb = None
        if not self.enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            with atomic_output(self.path, "w") as f:
                f.write("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _config_matches(record: dict, cfg: TrainConfig) -> bool:
    old = record.get("config", {})
    return all(old.get(k) == getattr(cfg, k) for k in RESULT_KEYS)


def train(cfg: TrainConfig) -> dict:
    """Train the stage described by `cfg` (or resume it); returns the done record."""
    out = Path(cfg.out)
    done_path = out / "done.json"
    if done_path.exists():
        record = json.loads(done_path.read_text())
        if _config_matches(record, cfg):
            log.info("%s: stage already trained (%d steps), skipped", out, record["steps"])
            return record
        raise UsageError(f"{done_path}: this stage was trained with another config; use another `out`")
    urls = expand_urls(cfg.data)
    info = init_distributed(cfg.dist_backend)
    try:
        return _train(cfg, info, urls, out)
    finally:
        cleanup(info)


def _train(cfg: TrainConfig, info: DistInfo, urls: list[str], out: Path) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cuda = info.device.type == "cuda"
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    autocast = (torch.autocast(device_type=info.device.type, dtype=torch.bfloat16)
                if bf16 else contextlib.nullcontext())
    torch.manual_seed(cfg.seed)
    model, pre_train, pre_val, tokenizer = models.create(
        cfg.model, cfg.pretrained, device=info.device, lock_image=cfg.lock_image,
        lock_image_unlocked_groups=cfg.lock_image_unlocked_groups, lock_text=cfg.lock_text,
        lock_text_unlocked_layers=cfg.lock_text_unlocked_layers)
    model_cfg = models.model_config(cfg.model, cfg.pretrained)

    num_samples = cfg.train_num_samples or count_samples(urls)
    worker_batches, steps_per_epoch = epoch_plan(num_samples, cfg.batch_size, info.world_size, cfg.workers)
    total_steps = cfg.steps or cfg.epochs * steps_per_epoch
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "train_config.json", to_dict(cfg))
        log.info("%s: %d shards, %d samples/epoch, %d steps/epoch, %d steps, global batch %d, %s%s",
                 out, len(urls), num_samples, steps_per_epoch, total_steps, cfg.batch_size * info.world_size,
                 cfg.engine, f" ZeRO-{cfg.zero_stage}" if cfg.engine == "deepspeed" else "")

    fused = cfg.engine != "deepspeed" if cfg.fused is None else cfg.fused
    optimizer = torch.optim.AdamW(param_groups(model, cfg.wd), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps, fused=fused or None)
    if cfg.engine == "deepspeed":
        model, optimizer = _deepspeed(model, optimizer, cfg, info)
    elif info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if cuda else None)
    from open_clip_train.scheduler import const_lr, cosine_lr
    schedule = (cosine_lr if cfg.lr_scheduler == "cosine" else const_lr)(optimizer, cfg.lr, cfg.warmup, total_steps)
    loss_fn = MaskedClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad,
                             rank=info.rank, world_size=info.world_size)

    ckpts = Checkpoints(out / "checkpoints", cfg.engine == "deepspeed", cfg.keep_checkpoints)
    step, epoch, start_positions = 0, 0, {}
    latest = ckpts.latest()
    if latest is not None:
        state = ckpts.load(latest, model, optimizer)
        if not all(state["config"].get(k) == getattr(cfg, k) for k in RESULT_KEYS):
            raise UsageError(f"{latest}: checkpoint of another config; use another `out` or remove it")
        step, epoch = int(state["step"]), int(state["epoch"])
        torch.set_rng_state(state["rng"][min(info.rank, len(state["rng"]) - 1)])
        positions = state["positions"]
        if len(positions) == info.world_size and state["workers"] == cfg.workers:
            start_positions = {int(w): int(n) for w, n in positions[info.rank].items()}
        else:
            log.warning("world size or workers changed: epoch %d restarts from its first batch", epoch)
        if info.is_main:
            log.info("resumed from %s at step %d (epoch %d)", latest, step, epoch)

    labeler, bucketed = make_labeler(cfg, urls, info)
    use_labels = cfg.labels != "none"
    stream = TrainStream(urls, pre_train if cfg.augment else pre_val, tokenizer, cfg.batch_size,
                         worker_batches, cfg.seed, info.rank, info.world_size, cfg.shuffle_buffer, labeler,
                         bucket_cap=(cfg.bucket_cap or 16 * cfg.batch_size) if bucketed else None)
    metrics = MetricsLog(out, step, info, cfg.tensorboard)
    t_start, step_at_start = time.time(), step
    last, data_problems = {}, {}
    try:
        while step < total_steps:
            stream.set_epoch(epoch, start_positions)
            positions, worker_stats, worker_problems = dict(start_positions), {}, {}
            start_positions = {}
            model.train()
            batches = iter(make_loader(stream, cfg.workers, _seed(cfg.seed, epoch)))
            exhausted = False
            while step < total_steps:
                batch = next(batches, None)
                if bucketed and info.distributed:  # ranks run out at different steps: pad until all have
                    if not any_rank(batch is not None, info):
                        exhausted = True
                        break
                    if batch is None:
                        batch = padding_batch(stream, info)
                elif batch is None:
                    exhausted = True
                    break
                images, tokens, labels, caption_ids, valid, binfo, _keys = batch
                if binfo is not None:
                    binfo = BatchInfo.decode(binfo)
                    positions[binfo.worker] = binfo.made
                    worker_problems[binfo.worker] = binfo.problems
                    worker_stats[binfo.worker] = binfo.stats
                images = images.to(info.device, non_blocking=True)
                tokens = tokens.to(info.device, non_blocking=True)
                lr = schedule(step)
                with autocast:
                    feats = model(images, tokens)
                    image_f, text_f, scale = _features(feats)
                    loss = loss_fn(image_f, text_f, scale, labels.to(info.device) if use_labels else None,
                                   caption_ids.to(info.device) if cfg.caption_dedup else None,
                                   valid.to(info.device))
                if cfg.engine == "deepspeed":
                    model.backward(loss)
                    model.step()
                else:
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    optimizer.step()
                with torch.no_grad():
                    _unwrap(model).logit_scale.clamp_(0, math.log(100))
                step += 1
                elapsed = time.time() - t_start
                sps = (step - step_at_start) * cfg.batch_size * info.world_size / max(elapsed, 1e-9)
                last = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": lr, "samples_per_s": sps,
                        "effective_negatives": loss_fn.last_effective_negatives,
                        "logit_scale": _unwrap(model).logit_scale.exp().item(), "time": time.time()}
                metrics.write(last)
                if info.is_main and (step % cfg.log_every == 0 or step == total_steps):
                    eta = (total_steps - step) * elapsed / max(step - step_at_start, 1)
                    log.info("step %d/%d epoch %d loss %.4f lr %.2e %.1f samples/s eta %s eff_neg %.1f scale %.1f",
                             step, total_steps, epoch, last["loss"], lr, sps, _hms(eta),
                             last["effective_negatives"], last["logit_scale"])
                if step % cfg.save_every == 0 or step == total_steps:
                    _save(ckpts, step, epoch, positions, cfg, model, optimizer, info)
            if bucketed:
                _report_epoch(out, epoch, step, worker_stats, info, complete=exhausted)
            for kind, n in _epoch_problems(epoch, worker_problems, info).items():
                data_problems[kind] = max(n, data_problems.get(kind, 0))
            if not exhausted:
                break  # the step budget ran out inside the epoch (the checkpoint knows where)
            epoch += 1
    finally:
        metrics.close()

    record = {"steps": step, "final_loss": last.get("loss"), "model_dir": str(out / "model"),
              "architecture": cfg.model, "data_problems": data_problems, "config": to_dict(cfg)}
    if info.is_main:
        models.save_model(_unwrap(model), cfg.model, model_cfg, out / "model")
        write_json(out / "done.json", record)
        log.info("%s: stage done, model in %s", out, out / "model")
    barrier(info)
    return record


def make_labeler(cfg: TrainConfig, urls: list[str], info: DistInfo):
    """(labeler, bucketed) for the config's `labels`."""
    bucketed = cfg.bucket if cfg.bucket is not None else cfg.labels.startswith("sidecars:")
    if cfg.labels.startswith("json:"):
        return JsonLabeler(cfg.labels[5:]), bucketed
    if not cfg.labels.startswith("sidecars:"):
        return no_labels, bucketed
    from pipeline.artifacts import StaleSidecarError, check_sidecar, read_sidecar_columns, sidecar_path
    from pipeline.assign import stage_record, stage_meta

    stage_dir = Path(cfg.labels[len("sidecars:"):])
    index, parent = stage_record(stage_dir)
    try:
        expect = stage_meta(stage_dir, index, parent)
        sizes: dict[int, int] = {}
        for url in urls:
            path = sidecar_path(stage_dir, url)
            if not path.exists():
                raise UsageError(f"{path}: no sidecar for shard {url}; run the assign step of {stage_dir}")
            check_sidecar(path, expect)  # refuses stale or foreign sidecars before training starts
            for lab in read_sidecar_columns(path)[2].tolist():
                sizes[lab] = sizes.get(lab, 0) + 1
    except StaleSidecarError as exc:
        raise UsageError(str(exc)) from exc
    min_size = cfg.fallback_min_batches * cfg.batch_size * info.world_size * max(1, cfg.workers)
    table = sidecar_label_table(sizes, expect.ks, min_size)
    if info.is_main:
        fell = sum(n for lab, n in sizes.items() if table[lab][2])
        log.info("%s: %d pseudo-labels, %d samples; %d samples in groups below %d fall back to a parent label",
                 stage_dir, len(sizes), sum(sizes.values()), fell, int(min_size))
    return SidecarLabeler(str(stage_dir), expect, table, cfg.missing_labels), bucketed


def any_rank(flag: bool, info: DistInfo) -> bool:
    t = torch.tensor([1 if flag else 0], device=info.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def padding_batch(stream: TrainStream, info: DistInfo):
    """A batch of masked entries, for a rank whose data ran out before the others'."""
    from PIL import Image

    blank = stream.transform(Image.new("RGB", (8, 8)))
    b = stream.batch_size
    return (blank.expand(b, *blank.shape).contiguous(), stream.tokenizer([""] * b),
            torch.full((b,), -1, dtype=torch.int64), torch.zeros(b, dtype=torch.int64),
            torch.zeros(b, dtype=torch.bool), None, [""] * b)


def _report_epoch(out: Path, epoch: int, step: int, worker_stats: dict, info: DistInfo, complete: bool) -> None:
    """Sum the loader's counters over workers and ranks; log and append to loader_stats.jsonl."""
    total = BucketStats()
    for stats in worker_stats.values():
        total = total.merge(stats)
    ranks = all_gather_object(total.as_list(), info)
    total = BucketStats()
    for values in ranks:
        total = total.merge(BucketStats.from_list(values))
    if info.is_main:
        record = {"epoch": epoch, "step": step, "complete": complete, **total.__dict__}
        with open(out / "loader_stats.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("epoch %d%s loader: %d samples, %d pure and %d mixed batches (%d early at the cap, %d short), "
                 "%d fallback samples, %d without a label, max %d buffered per worker", epoch,
                 "" if complete else " (stopped at the step budget)", total.samples,
                 total.pure_batches, total.mixed_batches, total.early_batches, total.short_batches,
                 total.fallback_samples, total.missing_labels, total.max_buffered)


def _epoch_problems(epoch: int, worker_problems: dict, info: DistInfo) -> dict[str, int]:
    """{kind: count} of the data problems the loader workers of all ranks met this epoch (each
    worker logs its first ones itself); the main rank logs the total once."""
    total = [0] * len(PROBLEM_KINDS)
    for values in all_gather_object([sum(col) for col in zip(*worker_problems.values())], info):
        total = [a + b for a, b in zip(total, values or [0] * len(PROBLEM_KINDS))]
    counts = {k: n for k, n in zip(PROBLEM_KINDS, total) if n}
    if counts and info.is_main:
        log.warning("epoch %d: the loader skipped data problems: %s", epoch,
                    ", ".join(f"{k}={n}" for k, n in counts.items()))
    return counts


def _features(out):
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"]
    return out[0], out[1], out[2]


def _save(ckpts: Checkpoints, step: int, epoch: int, positions: dict, cfg: TrainConfig, model, optimizer,
          info: DistInfo) -> None:
    state = {"step": step, "epoch": epoch, "name": cfg.model, "config": to_dict(cfg), "workers": cfg.workers,
             "positions": [{str(k): int(v) for k, v in p.items()} for p in all_gather_object(positions, info)],
             "rng": all_gather_object(torch.get_rng_state(), info)}
    ckpts.save(step, state, model, optimizer, info)


def _deepspeed(model, optimizer, cfg: TrainConfig, info: DistInfo):
    import deepspeed

    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.zero_stage},
        "gradient_clipping": cfg.grad_clip or 0.0,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if info.distributed:
        deepspeed.init_distributed(dist_backend=info.backend, auto_mpi_discovery=False)
    # DeepSpeed broadcasts parameters as byte views, which 0-dim tensors (open_clip's
    # logit_scale) cannot give: make them 1-dim; save_model restores the shape.
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.dim() == 0:
                p.data = p.data.reshape(1)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                                      dist_init_required=False)
    return engine, ds_optimizer


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


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
