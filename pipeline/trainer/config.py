"""The configuration of one stage's training job: a YAML file plus `key=value` overrides.

Keys are the fields of `TrainConfig`; a file may also hold them under a `train:` section.
Built through common.config (the path launch uses too): unknown keys, wrong types and
bad values are errors that name the key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from common.config import ConfigError, apply_overrides, from_mapping, to_dict
from common.io import read_yaml
from pipeline.trainer.trackers import check as check_trackers

__all__ = ["TrainConfig", "train_config", "load_train_config", "to_dict", "ConfigError"]


@dataclass(frozen=True)
class TrainConfig:
    data: str = ""                   # shard spec (brace pattern, folder, ::-joined, URLs)
    out: str = ""                    # the stage folder: checkpoints/, model/, metrics.jsonl, done.json
    # model and init
    modality: str = "clip"           # clip (image-text pairs, MaskedClipLoss) | image (two augmented views of each
                                     # image, SimCLR's NT-Xent: pipeline.trainer.ntxent; captions not needed)
    model: str = "mcl-tiny-vit"      # open_clip architecture or a config in configs/models (image: an image-only
                                     # one, pipeline.image_model)
    pretrained: str | None = None    # open_clip tag, checkpoint file, or saved stage folder
    quick_gelu: bool | None = None   # None: as the pretrained tag was trained (OpenAI: QuickGELU)
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    # data
    seed: int = 0
    batch_size: int = 64             # per rank
    workers: int | None = None       # DataLoader workers per rank; None: the rank's CPUs less one, at most 16
    prefetch_factor: int | None = None  # batches each worker keeps ready; None: what loader_memory_gb holds (1-4)
    loader_memory_gb: float = 4.0    # host memory per rank for prefetched batches (prefetch_factor: None)
    shuffle_buffer: int = 1000
    augment: bool = False            # open_clip's train transform instead of the eval one (clip)
    views: list | None = None        # image: the augmentations of the two views (pipeline.loader.views; None:
                                     # SimCLR's crops, flips, colour jitter and grayscale)
    train_num_samples: int | None = None  # samples per epoch (default: the shards' sizes.json)
    epochs: int = 1
    steps: int | None = None         # total steps; overrides epochs
    labels: str = "none"             # none | sidecars:<stage dir> | json:<field.path> (tests)
    bucket: str | None = None        # same-label batches: global (every step's batches on all ranks from one
                                     # group, pipeline.loader.global_stream) | slot (each rank x worker buckets its own
                                     # stream, pipeline.loader.buckets) | off; default: global for sidecar labels
    bucket_cap: int | None = None    # slot: buffered samples per DataLoader worker (default 16 x batch_size)
    regrouped: str | None = None     # stream: the regroup step's folder or URL (pipeline.regroup)
    fallback_min_batches: float = 1.0  # groups below this many global batches (slot: x workers) use their parent's
    max_fallback: float = 0.1        # refuse labels whose groups send a larger share of samples to a coarser label
    missing_labels: str = "error"    # slot: error | own: a sample without a sidecar entry gets a label of its own
    max_problem_rate: float = 0.01   # stop when the loaders skip a larger share of what they read (corrupt samples,
                                     # unreadable shards; checked at log steps from 1000 samples on, over all ranks)
    # loss
    caption_dedup: bool = False      # identical captions are not negatives of each other
    local_loss: bool = False
    gather_with_grad: bool = True
    # optimisation (open_clip's defaults for small models)
    lr: float = 5e-4
    wd: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup: int = 100
    lr_scheduler: str = "cosine"     # cosine | const
    grad_clip: float | None = None
    fused: bool | None = None        # torch's fused AdamW kernel (CPU and GPU); default: on, off with DeepSpeed
    # engine and precision
    engine: str = "ddp"              # ddp | deepspeed
    zero_stage: int = 2              # DeepSpeed ZeRO stage (1 or 2)
    precision: str = "auto"          # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    dist_backend: str = "auto"       # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    threads: int | None = None       # torch CPU threads per process
    # bookkeeping
    save_every: int = 100            # steps between checkpoints
    keep_checkpoints: int = 2
    log_every: int = 10
    peak_tflops: float | None = None  # the device's peak for the MFU estimate; None: known GPUs' bf16 dense peak
                                     # (set it for fp32 training)
    report_to: list[str] | str = field(default_factory=list)  # dashboards: tensorboard, wandb (pipeline.trainer.trackers)
    wandb_project: str | None = None  # default: $WANDB_PROJECT, else "mcl"
    wandb_entity: str | None = None
    extra: dict = field(default_factory=dict)  # free-form, recorded with the run

    def validate(self) -> list[str]:
        errors = []
        if not self.data:
            errors.append("data: a shard spec is required")
        if not self.out:
            errors.append("out: the stage folder is required")
        for name in ("batch_size", "epochs", "save_every", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                errors.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            errors.append(f"steps: must be >= 1, got {self.steps}")
        for name in ("workers", "warmup"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                errors.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.prefetch_factor is not None and self.prefetch_factor < 1:
            errors.append(f"prefetch_factor: must be >= 1, got {self.prefetch_factor}")
        for name in ("loader_memory_gb", "peak_tflops"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                errors.append(f"{name}: must be > 0, got {getattr(self, name)}")
        choices = {"lr_scheduler": ("cosine", "const"), "engine": ("ddp", "deepspeed"),
                   "precision": ("auto", "fp32", "bf16"), "dist_backend": ("auto", "gloo", "nccl")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                errors.append(f"{name}: must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.zero_stage not in (1, 2):
            errors.append(f"zero_stage: must be 1 or 2, got {self.zero_stage}")
        if not (self.labels == "none" or self.labels.startswith(("json:", "sidecars:"))):
            errors.append(f"labels: must be 'none', 'sidecars:<stage dir>' or 'json:<field.path>', "
                          f"got {self.labels!r}")
        if self.bucket not in (None, "global", "stream", "slot", "off"):
            errors.append(f"bucket: must be one of ['global', 'stream', 'slot', 'off'], got {self.bucket!r}")
        elif self.bucket in ("global", "stream") and not self.labels.startswith("sidecars:"):
            errors.append(f"bucket: {self.bucket} needs labels=sidecars:<stage dir>, got labels={self.labels!r}")
        elif self.bucket == "stream" and not self.regrouped:
            errors.append("bucket: stream needs regrouped=<the regroup step's folder or URL>")
        if not 0 <= self.max_fallback <= 1:
            errors.append(f"max_fallback: must be between 0 and 1, got {self.max_fallback}")
        if not 0 <= self.max_problem_rate <= 1:
            errors.append(f"max_problem_rate: must be between 0 and 1, got {self.max_problem_rate}")
        errors += self._modality_errors()
        if self.missing_labels not in ("error", "own"):
            errors.append(f"missing_labels: must be 'error' or 'own', got {self.missing_labels!r}")
        errors += check_trackers(self.report_to)
        if self.bucket_cap is not None and self.bucket_cap < self.batch_size:
            errors.append(f"bucket_cap: must be >= batch_size ({self.batch_size}), got {self.bucket_cap}")
        return errors

    def _modality_errors(self) -> list[str]:
        if self.modality not in ("clip", "image"):
            return [f"modality: must be one of ['clip', 'image'], got {self.modality!r}"]
        if self.modality == "clip":
            return [] if self.views is None else ["views: applies to modality: image only"]
        errors = [f"{name}: does not apply to modality: image" for name in
                  ("caption_dedup", "lock_image", "lock_text", "augment") if getattr(self, name)]
        from PIL import Image

        from pipeline.loader.views import TwoViews

        try:  # built and applied once: a transform for tensors only fails here, not in a DataLoader worker
            TwoViews(self.views, 32)(Image.new("RGB", (40, 40), (120, 60, 30)))
        except ValueError as exc:
            errors.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - whatever a transform raises on a PIL image
            errors.append(f"views: the transforms fail on a PIL image ({type(exc).__name__}: {str(exc)[:160]})")
        return errors


def batching(cfg: TrainConfig) -> str:
    """How the config batches: global | slot | off (`bucket`, or its default for `labels`)."""
    return cfg.bucket or ("global" if cfg.labels.startswith("sidecars:") else "off")


def recorded_batching(record: dict) -> str:
    """The batching a done record or checkpoint was trained with. Records from before the
    global loader hold none: their `bucket` was a bool, and sidecar labels meant slot."""
    if record.get("batching"):
        return record["batching"]
    config = record.get("config", {})
    bucket = config.get("bucket")
    if bucket is None:
        bucket = str(config.get("labels", "none")).startswith("sidecars:")
    return {True: "slot", False: "off"}.get(bucket, bucket)


def train_config(raw: dict, where: str = "", prefix: str = "") -> TrainConfig:
    """A validated TrainConfig from a mapping of its keys (ConfigError naming the key)."""
    cfg = from_mapping(TrainConfig, raw, where, prefix)
    return dataclasses.replace(cfg, out=str(Path(cfg.out))) if cfg.out else cfg


def load_train_config(path: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a config file (optional) and apply `key=value` overrides; raises ConfigError."""
    raw: dict = {}
    if path:
        raw = read_yaml(path, "config") or {}
        if isinstance(raw, dict) and isinstance(raw.get("train"), dict):
            raw = raw["train"]
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a train config must be a mapping")
    return train_config(apply_overrides(raw, overrides), path or "overrides")
