"""What the executor runs for a step: a job's spec, handed to the job in the job's own process.

Every job of pipeline/ and eval/ is a spec (a frozen dataclass beside the job), an entry
function that takes it and an `is_done(spec)`; `JOBS` maps a spec to them. `run_job` sets up
logging (and torch.distributed under Slurm, for training) and returns something small and
picklable for the run's state file.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import submitit

# spec class name -> (module, entry function); every module also has is_done(spec)
JOBS = {
    "SaveSpec": ("pipeline.save", "save"),
    "TrainConfig": ("pipeline.train", "train"),
    "EmbedSpec": ("pipeline.embed", "embed"),
    "ClusterSpec": ("pipeline.cluster", "cluster"),
    "AssignSpec": ("pipeline.assign", "assign"),
    "ReduceSpec": ("pipeline.reduce", "reduce"),
    "RegroupSpec": ("pipeline.regroup", "regroup"),
    "MergeSpec": ("pipeline.merge", "merge"),
    "EvalSpec": ("eval.suite", "evaluate"),
}


def job_module(spec):
    return importlib.import_module(JOBS[type(spec).__name__][0])


def is_done(spec) -> bool:
    """The job's own answer: its outputs exist and carry the fingerprint of this spec."""
    return job_module(spec).is_done(spec)


def conflict(spec) -> str | None:
    """Why the job's outputs cannot be made from this spec where they are (a job that has no
    such case: None)."""
    check = getattr(job_module(spec), "conflict", None)
    return check(spec) if check else None


# what the state file keeps of a job's returned record (a few numbers, not the whole record)
SUMMARY_KEYS = {"TrainConfig": ("steps", "final_loss"), "ClusterSpec": ("objective", "nmi_sample"),
                "ReduceSpec": ("nmi",), "RegroupSpec": ("samples", "fallback_samples")}


def _small(spec, out):
    """A job's return value as the state file keeps it."""
    if isinstance(out, Path):
        return str(out)
    if isinstance(out, list):
        return len(out)
    if isinstance(out, dict) and type(spec).__name__ in SUMMARY_KEYS:
        kept = {k: out.get(k) for k in SUMMARY_KEYS[type(spec).__name__]}
        if "groups" in out and isinstance(out["groups"], dict):
            kept["groups"] = out["groups"].get("groups")
        return kept
    return out


def run_job(spec):
    """Run the job of `spec` in this process."""
    from common.cli import setup_logging

    setup_logging()
    return _small(spec, getattr(job_module(spec), JOBS[type(spec).__name__][1])(spec))


class TrainStage(submitit.helpers.Checkpointable):
    """One stage's training as a checkpointable submitit callable: on preemption or timeout
    (Slurm's, or the local executor's signal before its timeout) submitit requeues the same
    call and training resumes from its latest checkpoint (at most save_every steps are redone)."""

    def __call__(self, spec) -> dict:
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")) > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return run_job(spec)


train_stage = TrainStage()


def function_for(spec):
    """The callable the executor submits for `spec`."""
    return train_stage if type(spec).__name__ == "TrainConfig" else run_job
