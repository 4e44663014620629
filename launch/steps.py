"""The functions the executor runs, one per kind of step: thin wrappers over the jobs of
pipeline/ and eval/ that set up logging (and torch.distributed under Slurm) in the job's
own process. They take the jobs' own keyword arguments and return something small and
picklable."""
from __future__ import annotations

import os
from pathlib import Path

import submitit


def _setup() -> None:
    from common.cli import setup_logging

    setup_logging()


def save_stage0(*, arch: str, pretrained: str, out: str, quick_gelu: bool | None = None) -> str:
    """Stage 0 (fine-tune mode): the pretrained model, saved like a trained stage (with the
    activation it needs recorded in its config)."""
    _setup()
    from pipeline import models

    model, *_ = models.create(arch, pretrained=pretrained, quick_gelu=quick_gelu)
    return str(models.save_model(model, arch, models.model_config(arch, pretrained, quick_gelu), out))


class TrainStage(submitit.helpers.Checkpointable):
    """One stage's training as a checkpointable submitit callable: on preemption or timeout
    (Slurm's, or the local executor's signal before its timeout) submitit requeues the same
    call and training resumes from its latest checkpoint (at most save_every steps are redone)."""

    def __call__(self, *, cfg) -> dict:
        _setup()
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")) > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        from pipeline.train import train

        record = train(cfg)
        return {"steps": record["steps"], "final_loss": record["final_loss"]}


train_stage = TrainStage()


def embed_task(*, model_ref: str, data: str, out: str, tower: str, task: int, tasks: int, batch_size: int,
               workers: int) -> int:
    _setup()
    from pipeline.embed import embed

    return len(embed(model_ref, data, out, tower=tower, task=task, tasks=tasks, batch_size=batch_size,
                     workers=workers, progress=False))


def cluster_stage(*, stage_dir: str, k: int, niter: int, seed: int, sample_size: int | None) -> dict:
    _setup()
    from pipeline.cluster import cluster

    stats = cluster(stage_dir, k=k, niter=niter, seed=seed, sample_size=sample_size)
    return {"objective": stats["objective"], "nmi_sample": stats["nmi_sample"]}


def assign_task(*, stage_dir: str, stage_index: int, parent: str | None, task: int, tasks: int) -> int:
    _setup()
    from pipeline.assign import assign

    return len(assign(stage_dir, stage_index, parent, task=task, tasks=tasks))


def reduce_stage(*, stage_dir: str, data: str) -> dict:
    _setup()
    from pipeline.assign import reduce

    stats = reduce(stage_dir, data=data)
    return {"nmi": stats["nmi"], "groups": stats["groups"]["groups"]}


def merge_stages(*, stage_dirs: list[str], out: str, names: list[str], per_stage_norm: bool) -> str:
    _setup()
    from pipeline.merge import merge

    return str(merge(stage_dirs, out, names, per_stage_norm))


def evaluate(*, models: list[str], out: str, mmvp: str | None, probes: str | None,
             benchmarks: list[str] = ()) -> dict:
    """The evaluations of a run in one job (the encoders are loaded once): MMVP-VLM on the
    benchmark folder `mmvp`, the attribute probes on the shards `probes` and the CLIP_benchmark
    data sets `benchmarks` (NAME[=ROOT], eval.zeroshot), when given."""
    _setup()
    from eval import probes as P
    from eval.encoders import load_encoder
    from eval import mmvp as M
    from eval import zeroshot as Z

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sets = [Z.parse_dataset_arg(b) for b in benchmarks]
    for bench in sets:
        Z.check(bench)  # before the models load
    encoders = [load_encoder(m, device) for m in models]
    result = {}
    if mmvp:
        result["mmvp"] = M.write_outputs(M.evaluate(mmvp, encoders), out)
    if probes:
        result["probes"] = P.write_outputs(P.probe(encoders, probes), out)
    if sets:
        result["zeroshot"] = Z.write_outputs(Z.evaluate(sets, encoders), out)
    return result


def evaluated(*, models: list[str], out: str, mmvp: str | None, probes: str | None, merged: str,
              benchmarks: list[str] = ()) -> bool:
    """`evaluate`'s records exist, are newer than the merged model and cover its benchmarks."""
    from eval import mmvp as M
    from eval import probes as P
    from eval import zeroshot as Z

    records = [Path(out) / name for name, wanted in
               ((M.SUMMARY_NAME, mmvp), (P.RECORD_NAME, probes), (Z.SUMMARY_NAME, benchmarks)) if wanted]
    fresh = bool(records) and all(r.exists() and Path(merged).exists()
                                  and r.stat().st_mtime >= Path(merged).stat().st_mtime for r in records)
    if fresh and benchmarks:
        import json

        from eval.encoders import parse_model_arg

        done = json.loads((Path(out) / Z.SUMMARY_NAME).read_text())
        return Z.covers(done, [parse_model_arg(m)[0] for m in models], list(benchmarks))
    return fresh
