"""The run config: one YAML file for a whole MCL run, validated before anything runs.

    run_dir: runs/tiny                 # everything the run writes goes here
    data: data/train/{00000..00009}.tar
    mmvp: data/mmvp                    # optional: evaluate the merged model and each stage
    probes: data/probe                 # optional: held-out shards of the synthetic world for attribute probes
    method: mcl                        # mcl | ensemble (independently seeded plain CLIP stages, merged alike)
    name: null                         # the merged model's name in the evaluations (default: the method)
    stages: 3                          # trained stages (a stage 0 is added when train.pretrained is set)
    clusters: 10                       # K after each stage (a number, or a list per stage)
    tower: image                       # what to cluster on: image | text | both
    cluster_niter: 20
    cluster_sample_size: null          # default 1024 x K
    stage_init: scratch                # scratch (new seed per stage) | previous (init from the last stage)
    per_stage_norm: true               # merge: normalise each stage's features before concatenating
    train: {...}                       # pipeline.train keys shared by every stage (model, batch_size, steps, ...)
    finetune: {...}                    # train keys overriding `train` in stages initialised from another stage
    executor:
      name: local                      # local | slurm
      timeout_min: 120
      signal_delay_s: 90               # USR2 this long before the timeout: training is requeued and resumes
      max_num_timeout: 3               # requeues after timeouts (preemptions requeue without limit)
      tasks: 2                         # array tasks of the embed and assign steps
      array_parallelism: 8
      slurm: {partition: ..., account: ..., gpus_per_node: ..., cpus_per_task: ..., mem_gb: ...,
              nodes: 1, additional_parameters: {...}}
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.train_config import TrainConfig
from common.cli import UsageError
from common.io import read_yaml

EXECUTOR_KEYS = {"name", "timeout_min", "signal_delay_s", "max_num_timeout", "tasks", "array_parallelism", "slurm"}


@dataclass
class RunConfig:
    run_dir: str
    data: str
    mmvp: str | None = None
    probes: str | None = None
    method: str = "mcl"
    name: str | None = None
    stages: int = 3
    clusters: list = field(default_factory=lambda: [10])
    tower: str = "image"
    cluster_niter: int = 20
    cluster_sample_size: int | None = None
    stage_init: str = "scratch"
    per_stage_norm: bool = True
    train: dict = field(default_factory=dict)
    finetune: dict = field(default_factory=dict)
    executor: dict = field(default_factory=lambda: {"name": "local"})

    def k(self, position: int) -> int:
        """K of the n-th clustering of the run (0-based; the last K repeats)."""
        return int(self.clusters[min(position, len(self.clusters) - 1)])

    @property
    def has_stage0(self) -> bool:
        return bool(self.train.get("pretrained"))


def load_run_config(path: str, overrides: list[str] = ()) -> RunConfig:
    """Read and validate; every problem found is listed in one UsageError."""
    import yaml

    try:
        raw = read_yaml(path, "run config")
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: a run config must be a mapping")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"override {item!r}: expected key=value (train.lr=1e-3 reaches into sections)")
        target = raw
        *parents, leaf = key.split(".")
        for p in parents:
            target = target.setdefault(p, {})
        target[leaf] = yaml.safe_load(value)
    return run_config(raw, path)


def run_config(raw: dict, source: str) -> RunConfig:
    """A validated RunConfig from a mapping; `source` names it in the error."""
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(raw) - known)
    errors = [f"unknown key {k!r}" for k in unknown]
    for required in ("run_dir", "data"):
        if not raw.get(required):
            errors.append(f"{required}: required")
    if errors:
        raise UsageError(f"{source}: " + "; ".join(errors))
    raw = dict(raw)
    if not isinstance(raw.get("clusters", [10]), list):
        raw["clusters"] = [raw["clusters"]]
    cfg = RunConfig(**raw)
    errors = validate(cfg)
    if errors:
        raise UsageError(f"{source}: " + "; ".join(errors))
    return cfg


def validate(cfg: RunConfig) -> list[str]:
    from pipeline import models
    from shards.reader import expand_urls

    errors = []
    urls = []
    try:
        urls = expand_urls(cfg.data)
    except UsageError as exc:
        errors.append(f"data: {exc}")
    if cfg.mmvp and not (Path(cfg.mmvp) / "Questions.csv").is_file():
        errors.append(f"mmvp: {cfg.mmvp}/Questions.csv missing")
    if cfg.method not in ("mcl", "ensemble"):
        errors.append(f"method: must be mcl or ensemble, got {cfg.method!r}")
    if cfg.method == "ensemble" and (cfg.has_stage0 or cfg.stage_init != "scratch"):
        errors.append("method: an ensemble trains every stage from scratch (no train.pretrained, stage_init scratch)")
    if cfg.probes:
        try:
            expand_urls(cfg.probes)
        except UsageError as exc:
            errors.append(f"probes: {exc}")
    if cfg.stages < 1:
        errors.append(f"stages: must be >= 1, got {cfg.stages}")
    if any(not isinstance(k, int) or k < 2 for k in cfg.clusters):
        errors.append(f"clusters: every K must be an integer >= 2, got {cfg.clusters}")
    if cfg.tower not in ("image", "text", "both"):
        errors.append(f"tower: must be image, text or both, got {cfg.tower!r}")
    if cfg.stage_init not in ("scratch", "previous"):
        errors.append(f"stage_init: must be scratch or previous, got {cfg.stage_init!r}")
    for section in ("train", "finetune"):
        keys = set(getattr(cfg, section))
        bad = sorted(keys - {f.name for f in dataclasses.fields(TrainConfig)} | (keys & {"data", "out", "labels"}))
        if bad:
            errors.append(f"{section}: unknown or run-managed keys {bad}")
    model = cfg.train.get("model", TrainConfig.model)
    if not models.known_architecture(model):
        errors.append(f"train.model: unknown architecture {model!r}")
    unknown_exec = sorted(set(cfg.executor) - EXECUTOR_KEYS)
    if unknown_exec:
        errors.append(f"executor: unknown keys {unknown_exec}")
    if cfg.executor.get("name", "local") not in ("local", "slurm"):
        errors.append(f"executor.name: must be local or slurm, got {cfg.executor.get('name')!r}")
    if urls and not errors and cfg.stages > 1 and cfg.method == "mcl":
        from pipeline.train import count_samples

        try:
            n = cfg.train.get("train_num_samples") or count_samples(urls)
            batch = int(cfg.train.get("batch_size", TrainConfig.batch_size))
            first_k = cfg.k(0)
            if n / first_k < batch:
                errors.append(f"train.batch_size: {batch} is larger than an average cluster can fill "
                              f"({n} samples / K={first_k})")
        except UsageError as exc:
            errors.append(str(exc))
    return errors
