"""The run config: one YAML file for a whole MCL run, validated before anything runs.

Built through common.config, like every job's config: `key=value` overrides with dotted keys,
values coerced to their types (`lr: 1e-3` is a float), and each stage's TrainConfig built and
validated here, by the same function the train job uses, before anything is submitted.
The sections `embed`, `cluster`, `reduce` and `merge` hold fields of those jobs' specs (the
spec is where each default is written); the run sets the others (paths, K, the task index).
`launch.run.plan` builds every step's spec from them (`job_spec`).

    run_dir: runs/tiny                 # everything the run writes goes here
    data: data/train/{00000..00009}.tar
    mmvp: data/mmvp                    # optional: evaluate the merged model and each stage
    sugarcrepe: data/sugar_crepe       # optional: SugarCrepe-format folder (eval.sugarcrepe)
    probes: data/probe                 # optional: held-out shards of the synthetic world for attribute probes
    benchmarks: [wds/cars=/data/cars, imagenet1k=/data/imagenet]  # optional: CLIP_benchmark sets (eval.zeroshot)
    method: mcl                        # mcl | ensemble (independently seeded plain CLIP stages, merged alike)
    modality: clip                     # clip | image: image-only stages (SimCLR views, NT-Xent; an image-only
                                       # train.model; captions not needed; evaluated by the probes)
    name: null                         # the merged model's name in the evaluations (default: the method)
    stages: 3                          # trained stages (a stage 0 is added when train.pretrained is set)
    clusters: 10                       # K after each stage (a number, or a list per stage)
    stage_init: scratch                # scratch (new seed per stage) | previous (init from the last stage)
    embed: {tower: image, batch_size: 256}  # pipeline.embed's spec fields (tower: what to cluster on)
    cluster: {niter: 20, sample_size: 200000}  # pipeline.cluster's spec fields; mode: split cuts each
                                       # group into children sized for the global batch
    reduce: {grid_per_cluster: 8}      # pipeline.reduce's spec fields
    merge: {per_stage_norm: true}      # pipeline.merge's spec fields
    train: {...}                       # pipeline.train keys shared by every stage (model, batch_size, steps, ...)
    later: {...}                       # train keys overriding `train` in stages 2 and after (e.g. more steps;
                                       # not in a stage 1 that fine-tunes a pretrained stage 0)
    finetune: {...}                    # train keys overriding those in stages initialised from another stage
    executor:
      name: local                      # local | slurm
      timeout_min: 120
      signal_delay_s: 90               # USR2 this long before the timeout: training is requeued and resumes
      max_num_timeout: 3               # requeues after timeouts (preemptions requeue without limit)
      tasks: 2                         # array tasks of the embed and assign steps
      array_parallelism: 8
      slurm:                         # shared by every step unless a step says otherwise
        partition: ...                 # also account, qos, constraint, cpus_per_task, mem_gb
        cpu_partition: ...             # the steps that need no GPU (save, assign, reduce, regroup, merge) go here
        nodes: 1                       # the training step's nodes
        gpus_per_node: 8               # the training step's GPUs per node (one task per GPU);
                                       # embed (per array task), cluster and eval take one GPU;
                                       # save, assign, reduce and merge run on the CPU
        additional_parameters: {...}   # extra sbatch parameters
        steps:                         # per kind of step, over those defaults
          train: {nodes: 2, mem_gb: 400, timeout_min: 1440}
          embed: {cpus_per_task: 8}    # keys: nodes, gpus_per_node, tasks_per_node, cpus_per_task,
                                       # mem_gb, partition, timeout_min, additional_parameters
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from common.cli import UsageError
from common.config import ConfigError, apply_overrides, coerce, from_mapping
from common.io import read_yaml
from pipeline.trainer.config import TrainConfig, train_config

RUN_MANAGED = ("data", "out", "labels")  # train keys the run sets for each stage


def _at_least(section, **bounds) -> list[str]:
    """A problem for each field below its bound (None: unset, no problem)."""
    return [f"{name}: must be >= {low}, got {getattr(section, name)}" for name, low in bounds.items()
            if getattr(section, name) is not None and getattr(section, name) < low]


STEP_KINDS = ("save", "train", "embed", "cluster", "assign", "reduce", "regroup", "merge", "eval")
GPU_STEPS = ("train", "embed", "cluster", "eval")  # the others run on the CPU
MULTI_NODE_STEPS = ("train",)


@dataclass
class StepResources:
    """What one kind of step asks Slurm for; None: the default for that kind."""
    nodes: int | None = None
    gpus_per_node: int | None = None
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    partition: str | None = None
    timeout_min: int | None = None
    additional_parameters: dict = field(default_factory=dict)

    def validate(self) -> list[str]:
        return _at_least(self, nodes=1, gpus_per_node=0, tasks_per_node=1, cpus_per_task=1, mem_gb=0, timeout_min=1)


@dataclass
class SlurmConfig:
    partition: str | None = None
    cpu_partition: str | None = None  # the steps that need no GPU (save, assign, reduce, regroup, merge) go here
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    nodes: int | None = None         # the training step's nodes (default 1)
    gpus_per_node: int = 0           # the training step's GPUs per node (one task each); the other GPU
                                     # steps (embed tasks, cluster, eval) take one GPU
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    additional_parameters: dict = field(default_factory=dict)
    steps: dict[str, StepResources] = field(default_factory=dict)  # per kind of step, over the defaults

    def validate(self) -> list[str]:
        errors = _at_least(self, nodes=1, gpus_per_node=0, cpus_per_task=1, mem_gb=0)
        for kind, res in self.steps.items():
            where = f"steps.{kind}"
            if kind not in STEP_KINDS:
                errors.append(f"{where}: unknown step (one of {', '.join(STEP_KINDS)})")
                continue
            errors += [f"{where}.{e}" for e in res.validate()]
            if res.gpus_per_node and kind not in GPU_STEPS:
                errors.append(f"{where}.gpus_per_node: the {kind} step runs on the CPU")
            if res.nodes is not None and res.nodes > 1 and kind not in MULTI_NODE_STEPS:
                errors.append(f"{where}.nodes: the {kind} step runs on one node (only train spans nodes)")
            if res.tasks_per_node is not None and kind not in MULTI_NODE_STEPS:
                errors.append(f"{where}.tasks_per_node: the {kind} step runs one task (only train runs one per GPU)")
        return errors

    def resources(self, kind: str) -> StepResources:
        """The resources of one kind of step: its defaults, then `steps.<kind>`."""
        gpus = 0
        if kind in GPU_STEPS and self.gpus_per_node:
            gpus = self.gpus_per_node if kind == "train" else 1
        partition = self.cpu_partition if kind not in GPU_STEPS and self.cpu_partition else self.partition
        res = StepResources(nodes=(self.nodes or 1) if kind == "train" else 1, gpus_per_node=gpus,
                            cpus_per_task=self.cpus_per_task, mem_gb=self.mem_gb, partition=partition,
                            additional_parameters=dict(self.additional_parameters))
        override = self.steps.get(kind, StepResources())
        for f in dataclasses.fields(StepResources):
            value = getattr(override, f.name)
            if f.name == "additional_parameters":
                res.additional_parameters.update(value)
            elif value is not None:
                setattr(res, f.name, value)
        if kind == "train" and res.tasks_per_node is None:
            res.tasks_per_node = res.gpus_per_node or 1  # one task per GPU (per node on CPUs)
        return res


@dataclass
class ExecutorConfig:
    name: str = "local"              # local | slurm
    timeout_min: int = 600           # submitit's local default is 2
    signal_delay_s: int = 90
    max_num_timeout: int = 3
    tasks: int = 1                   # array tasks of the embed and assign steps
    array_parallelism: int = 8
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def validate(self) -> list[str]:
        errors = [] if self.name in ("local", "slurm") else [f"name: must be local or slurm, got {self.name!r}"]
        return errors + _at_least(self, timeout_min=1, tasks=1, array_parallelism=1, signal_delay_s=0,
                                  max_num_timeout=0)


# run config section -> (the job's spec class, the fields the run sets for each step)
JOB_SECTIONS = {
    "embed": ("pipeline.embed:EmbedSpec", ("model", "data", "out", "pretrained", "task", "tasks")),
    "cluster": ("pipeline.cluster:ClusterSpec", ("stage", "k", "parent", "global_batch")),
    "reduce": ("pipeline.reduce:ReduceSpec", ("stage", "data", "global_batch", "fallback_below", "max_fallback")),
    "regroup": ("pipeline.regroup:RegroupSpec", ("stage", "data", "out", "world_size", "batch_size",
                                                 "fallback_min_batches", "task", "tasks")),
    "merge": ("pipeline.merge:MergeSpec", ("stages", "out", "names")),
}
# keys of earlier run configs -> (section, field)
MOVED_KEYS = {"tower": ("embed", "tower"), "cluster_niter": ("cluster", "niter"),
              "cluster_sample_size": ("cluster", "sample_size"), "per_stage_norm": ("merge", "per_stage_norm")}


def spec_class(section: str):
    import importlib

    module, name = JOB_SECTIONS[section][0].split(":")
    return getattr(importlib.import_module(module), name)


def job_spec(cfg: "RunConfig", section: str, **managed):
    """The spec of one step of job `section`: what the run sets, the config's section, and the
    spec's own defaults for the rest."""
    from common.spec import build

    return build(spec_class(section), managed, getattr(cfg, section))


@dataclass
class RunConfig:
    run_dir: str
    data: str
    mmvp: str | None = None
    sugarcrepe: str | None = None
    probes: str | None = None
    benchmarks: list[str] = field(default_factory=list)  # CLIP_benchmark data sets, NAME[=ROOT] (eval.zeroshot)
    method: str = "mcl"
    modality: str = "clip"
    name: str | None = None
    stages: int = 3
    clusters: list[int] = field(default_factory=lambda: [10])
    stage_init: str = "scratch"
    train: dict = field(default_factory=dict)
    later: dict = field(default_factory=dict)
    finetune: dict = field(default_factory=dict)
    embed: dict = field(default_factory=dict)
    cluster: dict = field(default_factory=dict)
    reduce: dict = field(default_factory=dict)
    regroup: dict = field(default_factory=dict)
    regrouped_root: str | None = None    # where bucket=stream stages' regrouped shards go (stage<s>/ under it: a folder
                                     # or a URL fsspec writes); default each stage folder's regrouped/
    merge: dict = field(default_factory=dict)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    def k(self, position: int) -> int:
        """K of the n-th clustering of the run (0-based; the last K repeats)."""
        return int(self.clusters[min(position, len(self.clusters) - 1)])

    @property
    def has_stage0(self) -> bool:
        return bool(self.train.get("pretrained"))

    @property
    def stage_numbers(self) -> list[int]:
        return ([0] if self.has_stage0 else []) + list(range(1, self.stages + 1))

    def parent(self, stage: int) -> int | None:
        """The stage whose clusters label `stage`'s batches (None: plain CLIP)."""
        if self.method != "mcl" or stage < 1 or (stage == 1 and not self.has_stage0):
            return None
        return stage - 1

    def validate(self) -> list[str]:
        return validate(self)


def stage_sections(cfg: RunConfig, stage: int) -> tuple[str, ...]:
    """The sections whose train keys a trained stage (>= 1) takes, the last winning: `later`
    from stage 2 on (a stage 1 after a pretrained stage 0 does not take it), `finetune` where
    the stage starts from another stage's model."""
    tuned = (cfg.stage_init == "previous" and cfg.parent(stage) is not None) or cfg.has_stage0
    return ("train",) + (("later",) if stage >= 2 else ()) + (("finetune",) if tuned else ())


def section_keys(cfg: RunConfig, sections: Sequence[str]) -> dict:
    keys: dict = {}
    for section in sections:
        keys.update(getattr(cfg, section))
    return keys


def stage_train_config(cfg: RunConfig, stage: int) -> TrainConfig:
    """The validated TrainConfig of a trained stage (>= 1) of the run."""
    from pipeline.stage import RunDir

    run = RunDir(cfg.run_dir)
    train = section_keys(cfg, stage_sections(cfg, stage))
    previous = cfg.parent(stage)
    train.update(data=cfg.data, out=str(run.stage(stage).path), modality=cfg.modality,
                 labels=run.stage(previous).label_source if previous is not None else "none")
    if cfg.stage_init == "previous" and previous is not None:
        train["pretrained"] = str(run.stage(previous).model_dir)
    elif cfg.has_stage0:  # the saved stage 0, not the tag: compute nodes need no download cache
        train["pretrained"] = str(run.stage(0).model_dir)
        train.pop("quick_gelu", None)  # the saved folder records it
    elif not cfg.has_stage0:  # scratch: a new seed per stage (with a stage 0, every stage fine-tunes it)
        train["seed"] = int(train.get("seed", 0)) + stage - 1
    if previous is not None and train.get("bucket") is None and _remote(cfg.data):
        train["bucket"] = "stream"  # data behind a URL: the regrouped shards, read whole
    if previous is not None and train.get("bucket") == "stream":
        train["regrouped"] = regroup_location(cfg, previous)
    return train_config(train, f"stage {stage}")


def train_world_size(cfg: RunConfig) -> int:
    """The ranks of a training step: nodes x tasks per node on Slurm, one process locally."""
    if cfg.executor.name != "slurm":
        return 1
    res = cfg.executor.slurm.resources("train")
    return int(res.nodes or 1) * int(res.tasks_per_node or 1)


@dataclass(frozen=True)
class LabelBatch:
    """How the stage trained on a stage's labels batches them."""
    stage: int                 # the stage trained on them
    global_batch: int
    fallback_below: float      # groups below this many samples fall back
    max_fallback: float


def label_batch(cfg: RunConfig, labels_of: int, train: TrainConfig | None = None) -> LabelBatch | None:
    """The batching of the stage trained on stage `labels_of`'s labels (None: no stage is)."""
    from pipeline.trainer.config import batching

    trained = next((s for s in cfg.stage_numbers if s >= 1 and cfg.parent(s) == labels_of), None)
    if trained is None:
        return None
    train = train or stage_train_config(cfg, trained)
    g = train.batch_size * train_world_size(cfg)
    slots = max(1, train_workers(cfg, train)) if batching(train) == "slot" else 1
    return LabelBatch(trained, g, train.fallback_min_batches * g * slots, train.max_fallback)


def train_workers(cfg: RunConfig, train: TrainConfig) -> int:
    """The DataLoader workers per rank the training step will run: the config's, or the
    automatic count (pipeline.loader.memory) for the CPUs of a training task (Slurm's
    cpus_per_task for train, else this machine's)."""
    from pipeline.loader.memory import auto_workers

    if train.workers is not None:
        return train.workers
    cpus = cfg.executor.slurm.resources("train").cpus_per_task if cfg.executor.name == "slurm" else None
    return auto_workers(cpus)


def _remote(data: str | None) -> bool:
    """Whether the data spec names shards behind a URL (not local or mounted paths)."""
    from shards.reader import expand_urls, is_local

    try:
        return any(not is_local(u) for u in expand_urls(data)) if data else False
    except UsageError:
        return False


def _modality_problems(cfg: RunConfig) -> list[str]:
    """What an image-only run cannot take: text benchmarks, a text tower to cluster on, a
    stage's own modality key."""
    if cfg.modality not in ("clip", "image"):
        return [f"modality: must be clip or image, got {cfg.modality!r}"]
    errors = [f"{section}.modality: the run's `modality` key sets every stage's" for section in
              ("train", "later", "finetune") if getattr(cfg, section).get("modality", cfg.modality) != cfg.modality]
    if cfg.modality == "image":
        errors += [f"{name}: needs a text tower; an image-only run (modality: image) is evaluated by the probes"
                   for name in ("mmvp", "sugarcrepe", "benchmarks") if getattr(cfg, name)]
        if cfg.embed.get("tower", "image") != "image":
            errors.append(f"embed.tower: an image-only model has only an image tower, got {cfg.embed['tower']!r}")
    return errors


def _unwritable(location: str) -> str | None:
    """Why the regroup steps could not write at `location` (one line), or None."""
    import fsspec

    try:
        fs, base = fsspec.core.url_to_fs(location.rstrip("/"))
        fs.makedirs(base, exist_ok=True)
        probe = f"{base}/.mcl-write-test"
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as exc:  # noqa: BLE001 - any storage error: the user's to fix before a run starts
        return f"regrouped_root: cannot write to {location} ({type(exc).__name__}: {str(exc)[:160]})"
    return None


def regroup_location(cfg: RunConfig, stage: int) -> str:
    """Where stage `stage`'s samples are regrouped for the stage trained on its labels."""
    from pipeline.stage import RunDir

    if cfg.regrouped_root:
        return f"{cfg.regrouped_root.rstrip('/')}/stage{stage}"
    return str(RunDir(cfg.run_dir).stage(stage).path / "regrouped")


def forecasts(cfg: RunConfig, samples: int) -> list[tuple[LabelBatch, tuple, object]]:
    """(batching, Ks, forecast Shares) of every stage trained on clustered labels, before any
    clustering exists (pipeline.group_sizing)."""
    from pipeline.group_sizing import forecast

    out = []
    numbers = cfg.stage_numbers
    for position, number in enumerate(numbers[:-1]):
        lb = label_batch(cfg, number)
        if lb is None:
            continue
        ks = tuple(cfg.k(p) for p in range(position + 1))
        target = cfg.cluster.get("target_batches", 4.0) if cfg.cluster.get("mode") == "split" else None
        out.append((lb, ks, forecast(samples, ks, lb.global_batch, lb.fallback_below, target)))
    return out


def load_run_config(path: str, overrides: Sequence[str] = ()) -> RunConfig:
    """Read, override and validate; every problem found is listed in one UsageError."""
    from common.io import project_file

    path = str(project_file(path))
    try:
        raw = read_yaml(path, "run config")
        if not isinstance(raw, dict):
            raise UsageError(f"{path}: a run config must be a mapping")
        return run_config(apply_overrides(raw, overrides), path)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def run_config(raw: dict, source: str, check: bool = True) -> RunConfig:
    """A validated RunConfig from a mapping; `source` names it in the error. `check=False`
    only builds and type-checks it (a run folder's recorded config, already validated)."""
    from common.spec import section as spec_section

    raw = _moved_keys(dict(raw), source)
    if "clusters" in raw and not isinstance(raw["clusters"], (list, tuple)):
        raw["clusters"] = [raw["clusters"]]
    errors: list[str] = []
    for section in ("train", "later", "finetune"):
        raw[section] = _train_section(raw.get(section), section, errors)
    for section, (_, managed) in JOB_SECTIONS.items():
        raw[section] = spec_section(spec_class(section), raw.get(section), managed, section, errors)
    try:
        cfg = from_mapping(RunConfig, raw, source, validate=check)
    except ConfigError as exc:
        raise UsageError("; ".join([str(exc)] + errors) if errors else str(exc)) from exc
    if errors:
        raise UsageError(f"{source}: " + "; ".join(errors))
    return cfg


def _moved_keys(raw: dict, source: str) -> dict:
    """Keys of earlier run configs, moved into their job's section (with a warning)."""
    import logging

    for key, (section, name) in MOVED_KEYS.items():
        if key in raw:
            value = raw.pop(key)
            target = raw.get(section)
            raw[section] = target = dict(target) if isinstance(target, dict) else {}
            target.setdefault(name, value)
            logging.getLogger("launch.config").warning("%s: `%s` is now `%s.%s`", source, key, section, name)
    return raw


def _train_section(raw, section: str, errors: list[str]) -> dict:
    """`train` / `later` / `finetune`: TrainConfig keys with values coerced to their types."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        errors.append(f"{section}: expected a mapping, got {raw!r}")
        return {}
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for key, value in raw.items():
        if key in RUN_MANAGED:
            errors.append(f"{section}.{key}: set by the run for each stage, not in the config")
        elif key not in hints:
            errors.append(f"{section}.{key}: unknown key")
        else:
            out[key] = coerce(value, hints[key], f"{section}.{key}", errors)
    return out


def _shards_gone(cfg: RunConfig, urls: list[str]) -> list[str]:
    """A shard that a stage of this run was embedded from must still be in the data (a folder
    spec would otherwise just drop it, and the run go on with clusters made with it)."""
    from pipeline.artifacts import shard_names
    from pipeline.stage import RunDir

    try:
        stems = set(shard_names(urls))
    except UsageError as exc:  # a shard listed twice
        return [f"data: {exc}"]
    run = RunDir(cfg.run_dir)
    for number in range(cfg.stages + 1):
        embeddings = run.stage(number).embeddings_dir
        gone = sorted(p.stem for p in embeddings.glob("*.npz") if p.stem not in stems) if embeddings.is_dir() else []
        if gone:
            return [f"data: shard(s) {', '.join(gone[:5])}{' ...' if len(gone) > 5 else ''} that stage{number} of "
                    f"{cfg.run_dir} was made from are no longer in {cfg.data}; restore them or use a new run_dir"]
    return []


def _section_problems(cfg: RunConfig, section: str) -> list[str]:
    """The problems the job's spec finds in the config's values (paths set to placeholders)."""
    import dataclasses

    cls = spec_class(section)
    placeholders = {f.name: f.type for f in dataclasses.fields(cls) if f.name in JOB_SECTIONS[section][1]}
    values = {name: (("-",) if "tuple" in str(t) else 1 if "int" in str(t) or "float" in str(t) else "-")
              for name, t in placeholders.items()}
    chosen = {k: v for k, v in getattr(cfg, section).items() if k not in values}
    spec = cls(**{**values, **chosen})
    from common.spec import problems

    return [e for e in problems(spec) if e.split(":")[0] in chosen]


def validate(cfg: RunConfig) -> list[str]:
    from pipeline import models
    from shards.reader import expand_urls

    errors = []
    urls = []
    try:
        urls = expand_urls(cfg.data)
    except UsageError as exc:
        errors.append(f"data: {exc}")
    if urls:
        errors += _shards_gone(cfg, urls)
    if cfg.mmvp and not (Path(cfg.mmvp) / "Questions.csv").is_file():
        errors.append(f"mmvp: {cfg.mmvp}/Questions.csv missing")
    if cfg.sugarcrepe:
        from eval import sugarcrepe

        try:
            sugarcrepe.read_sets(cfg.sugarcrepe)
        except UsageError as exc:
            errors.append(f"sugarcrepe: {exc}")
    from eval import zeroshot

    if zeroshot.duplicate_names(cfg.benchmarks):
        errors.append(f"benchmarks: {', '.join(zeroshot.duplicate_names(cfg.benchmarks))} given twice")
    for i, spec in enumerate(cfg.benchmarks):
        try:
            zeroshot.check(zeroshot.parse_dataset_arg(spec))
        except UsageError as exc:
            errors.append(f"benchmarks[{i}]: {exc}")
    if cfg.method not in ("mcl", "ensemble"):
        errors.append(f"method: must be mcl or ensemble, got {cfg.method!r}")
    errors += _modality_problems(cfg)
    if cfg.method == "ensemble" and (cfg.has_stage0 or cfg.stage_init != "scratch"):
        errors.append("method: an ensemble trains every stage from scratch (no train.pretrained, stage_init scratch)")
    if cfg.method == "ensemble" and cfg.later.get("pretrained"):
        errors.append("later.pretrained: an ensemble trains every stage from scratch")
    if cfg.probes:
        try:
            expand_urls(cfg.probes)
        except UsageError as exc:
            errors.append(f"probes: {exc}")
    if cfg.stages < 1:
        errors.append(f"stages: must be >= 1, got {cfg.stages}")
    if not cfg.clusters or any(k < 2 for k in cfg.clusters):
        errors.append(f"clusters: every K must be an integer >= 2, got {cfg.clusters}")
    for section in JOB_SECTIONS:  # each section's values through its spec's own checks
        errors += [f"{section}.{e}" for e in _section_problems(cfg, section)]
    if cfg.stage_init not in ("scratch", "previous"):
        errors.append(f"stage_init: must be scratch or previous, got {cfg.stage_init!r}")
    for section in ("train", "later", "finetune"):
        model = getattr(cfg, section).get("model", TrainConfig.model if section == "train" else None)
        if model is not None and not models.known_architecture(model):
            errors.append(f"{section}.model: unknown architecture {model!r}")
        elif model is not None and models.is_image_only(model) != (cfg.modality == "image"):
            errors.append(f"{section}.model: {model} is {'an image-only' if cfg.modality != 'image' else 'a CLIP'} "
                          f"model, the run's modality is {cfg.modality}")
    trained = [s for s in cfg.stage_numbers if s >= 1]
    placeholder = {"data": cfg.data or "-", "out": "-", "modality": cfg.modality}
    # every section over those it overrides, then what each stage really takes
    combos = [("train",), ("train", "later"), ("train", "later", "finetune")]
    combos += [c for c in dict.fromkeys(stage_sections(cfg, s) for s in trained) if c not in combos]
    for sections in combos:
        try:  # the same build and checks as every stage's (and the train job's own)
            # `later` reaches only stages trained on clusters (in an mcl run): their labels and
            # regrouped shards are the run's, stand-ins here
            clustered_keys = {"labels": "sidecars:-", "regrouped": "-"} \
                if "later" in sections and cfg.method == "mcl" else {}
            train_config({**section_keys(cfg, sections), **placeholder, **clustered_keys}, prefix=sections[-1])
        except ConfigError as exc:
            errors.append(str(exc))
            break
    clustered = [s for s in trained if cfg.parent(s) is not None]
    if urls and not errors and clustered:  # before stage 1 and a whole embedding pass are spent
        from pipeline.loader.global_stream import compressed_refusal, random_access_refusal
        from pipeline.trainer.config import batching

        problem = random_access_refusal(urls)
        batchings = {s: batching(stage_train_config(cfg, s)) for s in clustered}
        wanting = [s for s, b in batchings.items() if b == "global"]
        if problem and wanting:
            errors.append(f"stage {wanting[0]}: {problem}")
        streaming = [s for s, b in batchings.items() if b == "stream"]
        if streaming and compressed_refusal(urls, "bucket=stream (its regroup step)"):
            errors.append(f"stage {streaming[0]}: {compressed_refusal(urls, 'bucket=stream (its regroup step)')}")
        if cfg.regrouped_root and "stream" in batchings.values() and _unwritable(cfg.regrouped_root):
            errors.append(_unwritable(cfg.regrouped_root))
    if urls and not errors and clustered:
        from pipeline.group_sizing import fallback_refusal
        from shards.reader import count_samples

        try:
            n = int(cfg.train.get("train_num_samples") or count_samples(urls))
            for lb, ks, found in forecasts(cfg, n):
                if found.fallback > lb.max_fallback:
                    errors.append(fallback_refusal(f"stage {lb.stage} (N={n}, K={list(ks)})", found, lb.global_batch,
                                                   lb.max_fallback, forecast=True))
        except UsageError as exc:
            errors.append(str(exc))
    return errors
