"""Run the whole MCL DAG of one config through submitit, resumably.

For each stage: train -> embed (array) -> cluster -> assign (array) -> reduce (-> regroup
(array), when the next stage streams its same-group batches: bucket=stream) -> next stage;
then merge -> eval (MMVP-VLM, SugarCrepe-format sets, the attribute probes and CLIP_benchmark sets, when
configured); an ensemble run trains its stages alone. A step whose outputs exist and check
is skipped, so running the same command again resumes a run (training from its latest
checkpoint, also when submitit requeues it after a timeout or preemption) and a finished
run does no work. The executor is submitit's: `local` runs each job as a process on this
machine (no scheduler), `slurm` submits sbatch jobs and arrays; with `detach` every step is
submitted at once with afterok dependencies and Slurm runs the DAG alone.
Step states, job ids and log paths are kept in RUN_DIR/launch_state.json. A rerun after the
launcher itself was killed waits for the jobs it left running instead of submitting their
steps twice, and only one launcher at a time may hold a run folder (launch/jobs.py).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common.io import write_json
from launch import steps as S
from launch.config import RunConfig, forecasts, job_spec, label_batch, stage_train_config, train_world_size
from pipeline.stage import RunDir
from pipeline.trainer.config import TrainConfig

log = logging.getLogger("launch.run")


@dataclass
class Step:
    name: str
    calls: list       # the spec of each task (several = an array job)

    @property
    def fn(self) -> Callable:
        return S.function_for(self.calls[0])

    def done(self) -> bool:
        """The job's own "is this done?" for this spec (an array's tasks share it)."""
        return S.is_done(self.calls[0])


def plan(cfg: RunConfig) -> list[Step]:
    """The steps of the run, in order, each with its job's spec."""
    from eval.encoders import parse_model_arg
    from eval.suite import EvalSpec
    from pipeline.assign import AssignSpec
    from pipeline.save import SaveSpec

    run = RunDir(cfg.run_dir)
    tasks = cfg.executor.tasks
    out: list[Step] = []
    names = cfg.stage_numbers
    stages = {s: run.stage(s) for s in names}
    for position, number in enumerate(names):
        stage = stages[number]
        if number == 0:
            save = SaveSpec(model=cfg.train.get("model", TrainConfig.model), pretrained=cfg.train["pretrained"],
                            out=str(stage.model_dir), quick_gelu=cfg.train.get("quick_gelu"))
            out.append(Step("stage0/save", [save]))
        else:
            out.append(Step(f"stage{number}/train", [stage_train_config(cfg, number)]))
        if number == names[-1] or cfg.method == "ensemble":
            continue  # the last stage is not clustered, nor any stage of an ensemble
        parent = str(stages[names[position - 1]].path) if position > 0 else None
        path = str(stage.path)
        out.append(Step(f"stage{number}/embed", [job_spec(cfg, "embed", model=str(stage.model_dir), data=cfg.data,
                                                          out=path, task=t, tasks=tasks) for t in range(tasks)]))
        lb = label_batch(cfg, number)
        g = lb.global_batch if lb else None
        out.append(Step(f"stage{number}/cluster", [job_spec(cfg, "cluster", stage=path, k=cfg.k(position),
                                                            parent=parent, global_batch=g)]))
        out.append(Step(f"stage{number}/assign", [AssignSpec(stage=path, stage_index=number, parent=parent, task=t,
                                                             tasks=tasks) for t in range(tasks)]))
        out.append(Step(f"stage{number}/reduce", [job_spec(
            cfg, "reduce", stage=path, data=cfg.data, global_batch=g, fallback_below=lb.fallback_below if lb else None,
            max_fallback=lb.max_fallback if lb else None)]))
        trained = stage_train_config(cfg, lb.stage) if lb else None
        if trained is not None and trained.bucket == "stream":  # laid out for that stage's W x B
            out.append(Step(f"stage{number}/regroup", [job_spec(
                cfg, "regroup", stage=path, data=cfg.data, out=trained.regrouped, world_size=train_world_size(cfg),
                batch_size=trained.batch_size, fallback_min_batches=trained.fallback_min_batches, task=t, tasks=tasks)
                for t in range(tasks)]))
    model_dirs = tuple(str(stages[s].model_dir) for s in names)
    out.append(Step("merge", [job_spec(cfg, "merge", stages=model_dirs, out=str(run.merged),
                                       names=tuple(f"stage{s}" for s in names))]))
    if cfg.mmvp or cfg.sugarcrepe or cfg.probes or cfg.benchmarks:
        models = (f"{cfg.name or cfg.method}={run.merged}",) + tuple(f"stage{s}={stages[s].model_dir}" for s in names)
        out.append(Step("eval", [EvalSpec(models=models, out=str(run.eval_dir), mmvp=cfg.mmvp,
                                          sugarcrepe=cfg.sugarcrepe, probes=cfg.probes,
                                          benchmarks=tuple(cfg.benchmarks),
                                          compare=tuple(parse_model_arg(m)[0] for m in models))]))
    return out


def make_executor(cfg: RunConfig, step: Step, after: list[str] | None = None):
    import submitit

    ex = cfg.executor
    folder = RunDir(cfg.run_dir).logs / "%j"
    # max_num_timeout: requeues after a timeout; preemptions are not counted
    if ex.name == "local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=ex.max_num_timeout)
        executor.update_parameters(timeout_min=ex.timeout_min, signal_delay_s=ex.signal_delay_s)
    else:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=ex.max_num_timeout)
        executor.update_parameters(**slurm_parameters(cfg, step, after))
    executor.update_parameters(name=f"mcl-{step.name.replace('/', '-')}")
    return executor


def step_kind(name: str) -> str:
    """stage2/train -> train, merge -> merge: the key of the step's resources."""
    return name.rsplit("/", 1)[-1]


def slurm_parameters(cfg: RunConfig, step: Step, after: list[str] | None = None) -> dict:
    """submitit's parameters for `step`, from its kind's resources (launch.config); `after`: job
    ids it must wait for (sbatch --dependency afterok, and cancelled if one of them fails)."""
    sl = cfg.executor.slurm
    res = sl.resources(step_kind(step.name))
    params = {"timeout_min": res.timeout_min or cfg.executor.timeout_min,
              "slurm_signal_delay_s": cfg.executor.signal_delay_s, "slurm_nodes": res.nodes}
    for key in ("account", "constraint", "qos"):
        if getattr(sl, key) is not None:
            params[f"slurm_{key}"] = getattr(sl, key)
    for key in ("partition", "cpus_per_task", "mem_gb", "tasks_per_node"):
        if getattr(res, key) is not None:
            params[f"slurm_{key}"] = getattr(res, key)
    if res.gpus_per_node:
        params["slurm_gpus_per_node"] = res.gpus_per_node
    extra = dict(res.additional_parameters)
    if after:
        whole = list(dict.fromkeys(j.split("_")[0] for j in after))  # an array's id covers its tasks
        extra.update(dependency="afterok:" + ":".join(whole), kill_on_invalid_dep="yes")
    if extra:
        params["slurm_additional_parameters"] = extra
    if len(step.calls) > 1:
        params["slurm_array_parallelism"] = cfg.executor.array_parallelism
    return params


_stdout_lock = threading.Lock()


def emit(line: str, label: str | None = None) -> None:
    """Print one whole line (prefixed by [label]) even with several launchers in threads."""
    with _stdout_lock:
        print(f"[{label}] {line}" if label else line, flush=True)


class StateFile:
    def __init__(self, run_dir: Path):
        self.path = RunDir(run_dir).state
        self.state = json.loads(self.path.read_text()) if self.path.exists() else {}

    def set(self, step: str, **fields) -> None:
        self.state[step] = {**self.state.get(step, {}), **fields, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_json(self.path, self.state, sort_keys=False)


def run(cfg: RunConfig, dry_run: bool = False, label: str | None = None, detach: bool = False) -> dict:
    """Run (or print, with dry_run) every step not yet done; returns {step: state}. `label`
    prefixes the printed lines (several runs printing side by side). With `detach` (Slurm only)
    every step not done is submitted at once, each depending on the one before, and the call
    returns: Slurm runs the DAG without a launcher."""
    from launch.jobs import run_lock
    from common.cli import UsageError

    if detach and cfg.executor.name != "slurm":
        raise UsageError("--detach: needs executor.name=slurm (the local executor has no job dependencies)")
    run_dir = Path(cfg.run_dir)
    if dry_run:
        return _run(cfg, True, label, False)
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):
        return _run(cfg, False, label, detach)


def _run(cfg: RunConfig, dry_run: bool, label: str | None, detach: bool) -> dict:
    from common.cli import UsageError

    run_dir = Path(cfg.run_dir)
    say = functools.partial(emit, label=label)
    steps = plan(cfg)
    conflicts = {step.name: S.conflict(step.calls[0]) for step in steps}
    first = next((c for c in conflicts.values() if c), None)
    if first and not dry_run:  # e.g. a stage trained with another config: stop before anything is written
        raise UsageError(first)
    if not dry_run:
        write_json(RunDir(run_dir).config, dataclasses.asdict(cfg), if_changed=True)
    for line in forecast_lines(cfg):
        say(line)
    state = StateFile(run_dir)
    result = {}
    chain: list[str] = []  # detach: the jobs of the step before, which the next one depends on
    planned = False  # dry run: once a step would run, every later one would run too
    for step in steps:
        if not chain and not planned and step.done():  # after a submitted step, every later one runs again
            result[step.name] = "done"
            if not dry_run and state.state.get(step.name, {}).get("state") != "done":
                state.set(step.name, state="done")
            say(f"{step.name:<20} done")
            continue
        if dry_run:
            params = slurm_parameters(cfg, step) if cfg.executor.name == "slurm" else \
                {"timeout_min": cfg.executor.timeout_min}
            say(f"{step.name:<20} would run {len(step.calls)} task(s) on {cfg.executor.name}: "
                f"{params}" + (f" (conflict: {conflicts[step.name]})" if conflicts[step.name] else ""))
            result[step.name] = "planned"
            planned = True
            continue
        if detach:
            chain = _submit_detached(cfg, step, state, say, chain)
            result[step.name] = "submitted"
            continue
        if _wait_for_earlier_launch(cfg, step, state, say):
            result[step.name] = "done"
            continue
        started = time.monotonic()
        jobs = _submit(cfg, step, state)
        say(f"{step.name:<20} running job(s) {', '.join(j.job_id for j in jobs)}")
        try:
            outputs = [j.results()[0] for j in jobs]  # a multi-task job: every task's, rank 0's kept
        except Exception as exc:
            reason = _last_line(exc)
            state.set(step.name, state="failed", error=reason)
            raise StepFailed(f"step {step.name} failed: {reason}; log: {jobs[0].paths.stderr}") from exc
        state.set(step.name, state="done", output=outputs if len(outputs) > 1 else outputs[0])
        say(f"{step.name:<20} finished in {time.monotonic() - started:.0f} s")
        if step.name.endswith("/reduce"):
            say(f"{step.name:<20} {measured_line(step.calls[0])}")
        result[step.name] = "done"
    return result


def forecast_lines(cfg: RunConfig) -> list[str]:
    """One line per stage trained on clustered labels: its forecast pure / mixed / fallback
    shares (launch.config.forecasts); nothing when the data cannot be counted yet."""
    from common.cli import UsageError
    from shards.reader import count_samples, expand_urls

    try:
        n = int(cfg.train.get("train_num_samples") or count_samples(expand_urls(cfg.data)))
    except UsageError:
        return []
    from pipeline.trainer.config import batching

    mode = cfg.cluster.get("mode", "flat")
    lines = []
    for lb, ks, found in forecasts(cfg, n):
        line = (f"{'forecast':<20} stage {lb.stage} on K={list(ks)} ({mode}) at global batch {lb.global_batch}: "
                f"{found.line()}")
        train = stage_train_config(cfg, lb.stage)
        if batching(train) == "slot" and lb.global_batch > train.batch_size:  # what skipping the regroup costs
            kept = train.batch_size + (lb.global_batch - train.batch_size) / max(found.groups, 1)
            line += (f"; bucket=slot: each rank's batch is one group, the gathered batch W of them, so an anchor "
                     f"keeps about {kept:,.0f} of its {lb.global_batch - 1:,} negatives (bucket=stream or global: "
                     f"all of them on a pure step)")
        lines.append(line)
    return lines


def measured_line(spec) -> str:
    """The reduce step's measured shares of the next stage's samples (pipeline.reduce)."""
    from pipeline.stage import StageDir

    try:
        found = json.loads(StageDir(spec.stage).groups.read_text()).get("batch_shares")
    except (OSError, ValueError):
        found = None
    if not found:
        return "labels measured: no global batch to measure them against"
    return (f"labels measured at global batch {found['global_batch']}: {found['groups']} groups, "
            f"{100 * found['pure']:.1f}% of samples in pure steps, {100 * found['mixed']:.1f}% mixed, "
            f"{100 * found['fallback']:.1f}% fall back to a coarser label")


class StepFailed(RuntimeError):
    """A job of the run failed; the message is one line: the step, the job's error, its log."""


def _last_line(exc: BaseException) -> str:
    """The job's own error line: submitit's message holds the job's traceback between two
    rules of dashes, then the paths of its logs."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    rules = [i for i, line in enumerate(lines) if len(line) > 3 and set(line) == {"-"}]
    if len(rules) >= 2 and rules[-1] - rules[-2] > 1:
        return lines[rules[-1] - 1][:300]
    return lines[-1][:300] if lines else type(exc).__name__


def _submit(cfg: RunConfig, step: Step, state: StateFile, after: list[str] | None = None) -> list:
    executor = make_executor(cfg, step, after)
    if len(step.calls) == 1:
        jobs = [executor.submit(step.fn, step.calls[0])]
    else:
        with executor.batch():  # an array job
            jobs = [executor.submit(step.fn, spec) for spec in step.calls]
    state.set(step.name, state="running", job_ids=[j.job_id for j in jobs], logs=[str(j.paths.stderr) for j in jobs],
              after=after or [])
    return jobs


def _earlier_jobs_alive(cfg: RunConfig, step: Step, state: StateFile) -> list[str]:
    """The jobs an earlier launch submitted for `step` that are still queued or running."""
    from launch.jobs import live_jobs

    record = state.state.get(step.name, {})
    if record.get("state") != "running":
        return []
    return live_jobs(cfg.executor.name, record.get("job_ids", []), Path(cfg.run_dir))


def _submit_detached(cfg: RunConfig, step: Step, state: StateFile, say, after: list[str]) -> list[str]:
    """Submit `step` to start once `after` succeeded (its jobs of an earlier launch, if still
    queued, are kept); the job ids the next step depends on."""
    alive = _earlier_jobs_alive(cfg, step, state)
    if alive:
        say(f"{step.name:<20} kept job(s) {', '.join(alive)} of an earlier launch")
        return alive
    ids = [j.job_id for j in _submit(cfg, step, state, after)]
    say(f"{step.name:<20} submitted job(s) {', '.join(ids)}" + (f" after {', '.join(after)}" if after else ""))
    return ids


def _wait_for_earlier_launch(cfg: RunConfig, step: Step, state: StateFile, say) -> bool:
    """Wait for the jobs of `step` that an earlier, killed launcher left running; True when they
    produced the step's outputs (otherwise the step is submitted again)."""
    from launch.jobs import live_jobs, wait_for

    alive = _earlier_jobs_alive(cfg, step, state)
    if not alive:
        return False
    executor = cfg.executor.name
    say(f"{step.name:<20} waiting for job(s) {', '.join(alive)} of an earlier launch")
    wait_for(lambda: live_jobs(executor, alive, Path(cfg.run_dir)), poll_s=2 if executor == "local" else 10)
    if not step.done():
        say(f"{step.name:<20} the earlier job(s) ended without its outputs; submitting again")
        return False
    state.set(step.name, state="done")
    say(f"{step.name:<20} finished by the earlier launch's job(s)")
    return True


def status(run_dir: str) -> list[tuple[str, str, str, str]]:
    """(step, state, job ids, log) for every step of a run."""
    from common.cli import UsageError
    from launch.config import run_config

    cfg_path = RunDir(run_dir).config
    if not cfg_path.is_file():
        raise UsageError(f"{cfg_path}: missing; not a run folder (python -m launch run writes it)")
    cfg = run_config(json.loads(cfg_path.read_text()), str(cfg_path), check=False)
    recorded = StateFile(Path(run_dir)).state
    rows = []
    for step in plan(cfg):
        rec = recorded.get(step.name, {})
        if S.conflict(step.calls[0]):  # e.g. a stage folder trained with another config than the recorded one
            state = "conflict"
        else:
            state = "done" if step.done() else rec.get("state", "pending")
        rows.append((step.name, state, ",".join(rec.get("job_ids", [])), (rec.get("logs") or [""])[0]))
    return rows
