"""Run the whole MCL DAG of one config through submitit, resumably.

For each stage: train -> embed (array) -> cluster -> assign (array) -> reduce -> next
stage; then merge -> eval (MMVP-VLM and the attribute probes, when configured); an ensemble
run trains its stages alone. A step whose outputs exist and check is skipped, so running
the same command again resumes a run (training from its latest checkpoint, also when
submitit requeues it after a timeout or preemption) and a finished run does no work. The
executor is submitit's: `local` runs each job as a process on this machine (no scheduler),
`slurm` submits sbatch jobs and arrays; with `detach` every step is submitted at once with
afterok dependencies and Slurm runs the DAG alone.
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

from launch import steps as S
from launch.config import RunConfig
from common.io import write_json

log = logging.getLogger("launch.run")


@dataclass
class Step:
    name: str
    fn: Callable
    args: list            # one tuple of arguments per task (several = an array job)
    done: Callable[[], bool]
    gpus: int = 0


def stage_names(cfg: RunConfig) -> list[int]:
    return ([0] if cfg.has_stage0 else []) + list(range(1, cfg.stages + 1))


def train_config(cfg: RunConfig, stage: int) -> dict:
    from pipeline.train_config import TrainConfig, to_dict

    run = Path(cfg.run_dir)
    train = dict(cfg.train)
    train.update(data=cfg.data, out=str(run / f"stage{stage}"))
    previous = stage - 1 if (stage > 1 or cfg.has_stage0) and cfg.method == "mcl" else None
    train["labels"] = f"sidecars:{run / f'stage{previous}'}" if previous is not None else "none"
    if cfg.stage_init == "previous" and previous is not None:
        train.update(cfg.finetune, pretrained=str(run / f"stage{previous}" / "model"))
    elif cfg.has_stage0:
        train.update(cfg.finetune)  # every stage fine-tunes the pretrained stage 0
    else:
        train["seed"] = int(train.get("seed", 0)) + stage - 1  # scratch: a new seed per stage
    return to_dict(TrainConfig(**train))


def plan(cfg: RunConfig) -> list[Step]:
    from pipeline.artifacts import embeddings_model_fp, embeddings_path
    from pipeline.embed import model_fingerprint
    from shards.reader import expand_urls

    run = Path(cfg.run_dir)
    urls = expand_urls(cfg.data)
    tasks = int(cfg.executor.get("tasks", 1))
    out: list[Step] = []
    names = stage_names(cfg)
    for position, stage in enumerate(names):
        sdir = run / f"stage{stage}"
        model_dir = sdir / "model"
        if stage == 0:
            arch = cfg.train.get("model")
            out.append(Step("stage0/save", S.save_stage0, [(arch, cfg.train["pretrained"], str(model_dir))],
                            lambda m=model_dir: (m / "open_clip_config.json").is_file()))
        else:
            out.append(Step(f"stage{stage}/train", S.train_stage, [(train_config(cfg, stage),)],
                            lambda d=sdir: (d / "done.json").is_file(), gpus=1))
        if stage == names[-1] or cfg.method == "ensemble":
            continue  # the last stage is not clustered, nor any stage of an ensemble
        k = cfg.k(position)
        parent = str(run / f"stage{names[position - 1]}") if position > 0 else None

        def embedded(d=sdir, m=model_dir):
            fp = model_fingerprint(str(m), None, cfg.tower) if (m / "open_clip_pytorch_model.bin").exists() else None
            return fp is not None and all(embeddings_model_fp(embeddings_path(d, u)) == fp for u in urls)

        out.append(Step(f"stage{stage}/embed", S.embed_task,
                        [(str(model_dir), cfg.data, str(sdir), cfg.tower, t, tasks, 256, 2) for t in range(tasks)],
                        embedded, gpus=1))
        out.append(Step(f"stage{stage}/cluster", S.cluster_stage,
                        [(str(sdir), k, cfg.cluster_niter, 0, cfg.cluster_sample_size)],
                        lambda d=sdir, k=k: _clustered(d, k, cfg.cluster_niter, cfg.cluster_sample_size), gpus=1))
        out.append(Step(f"stage{stage}/assign", S.assign_task,
                        [(str(sdir), stage, parent, t, tasks) for t in range(tasks)],
                        lambda d=sdir, i=stage, p=parent: _assigned(d, i, p, urls)))
        out.append(Step(f"stage{stage}/reduce", S.reduce_stage, [(str(sdir), stage, parent, cfg.data)],
                        lambda d=sdir: (d / "clusters" / "assign_stats.json").is_file()
                        and _newer(d / "clusters" / "assign_stats.json", d / "clusters" / "centroids.npy")))
    merged = run / "merged.pt"
    model_dirs = [str(run / f"stage{s}" / "model") for s in names]
    out.append(Step("merge", S.merge_stages, [(model_dirs, str(merged), [f"stage{s}" for s in names],
                                                cfg.per_stage_norm)],
                    lambda: merged.is_file() and all(_newer(merged, Path(m) / "open_clip_pytorch_model.bin")
                                                     for m in model_dirs)))
    specs = [f"{cfg.name or cfg.method}={merged}"] + [f"stage{s}={run / f'stage{s}' / 'model'}" for s in names]
    records = [run / "eval" / name for name, data in (("mmvp_summary.json", cfg.mmvp), ("probes.json", cfg.probes))
               if data]
    if records:
        out.append(Step("eval", S.evaluate, [(specs, str(run / "eval"), cfg.mmvp, cfg.probes)],
                        lambda: all(_newer(r, merged) for r in records)))
    return out


def _newer(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and a.stat().st_mtime >= b.stat().st_mtime


def _clustered(stage_dir: Path, k: int, niter: int, sample_size) -> bool:
    stats = stage_dir / "clusters" / "stats.json"
    if not stats.is_file():
        return False
    params = json.loads(stats.read_text()).get("params", {})
    return params.get("k") == k and params.get("niter") == niter and \
        params.get("sample_size") == (sample_size or 1024 * k)


def _assigned(stage_dir: Path, index: int, parent: str | None, urls) -> bool:
    from pipeline.artifacts import check_sidecar, sidecar_path
    from pipeline.assign import stage_meta

    try:
        meta = stage_meta(stage_dir, index, Path(parent) if parent else None)
        for u in urls:
            check_sidecar(sidecar_path(stage_dir, u), meta)
        return True
    except Exception:  # noqa: BLE001 - anything missing or stale means: not done
        return False


def make_executor(cfg: RunConfig, step: Step, after: list[str] | None = None):
    import submitit

    ex = cfg.executor
    folder = Path(cfg.run_dir) / "logs" / "%j"
    requeues = int(ex.get("max_num_timeout", 3))  # requeues after a timeout; preemptions are not counted
    if ex.get("name", "local") == "local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=requeues)
        executor.update_parameters(timeout_min=int(ex.get("timeout_min", 600)),  # submitit's default is 2
                                   signal_delay_s=int(ex.get("signal_delay_s", 90)))
    else:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=requeues)
        executor.update_parameters(**slurm_parameters(cfg, step, after))
    executor.update_parameters(name=f"mcl-{step.name.replace('/', '-')}")
    return executor


def slurm_parameters(cfg: RunConfig, step: Step, after: list[str] | None = None) -> dict:
    """submitit's parameters for `step`; `after`: job ids it must wait for (sbatch --dependency
    afterok, and cancelled if one of them fails)."""
    sl = dict(cfg.executor.get("slurm", {}))
    params = {"timeout_min": int(cfg.executor.get("timeout_min", 600)),
              "slurm_signal_delay_s": int(cfg.executor.get("signal_delay_s", 90))}
    for key in ("partition", "account", "cpus_per_task", "mem_gb", "nodes", "constraint", "qos"):
        if key in sl:
            params[f"slurm_{key}"] = sl[key]
    gpus = int(sl.get("gpus_per_node", 0)) if step.gpus else 0
    if gpus:
        params["slurm_gpus_per_node"] = gpus
        if step.name.endswith("/train"):
            params["slurm_tasks_per_node"] = gpus  # one task per GPU; torch.distributed from the Slurm job
    extra = dict(sl.get("additional_parameters") or {})
    if after:
        whole = list(dict.fromkeys(j.split("_")[0] for j in after))  # an array's id covers its tasks
        extra.update(dependency="afterok:" + ":".join(whole), kill_on_invalid_dep="yes")
    if extra:
        params["slurm_additional_parameters"] = extra
    if len(step.args) > 1:
        params["slurm_array_parallelism"] = int(cfg.executor.get("array_parallelism", 8))
    return params


_stdout_lock = threading.Lock()


def emit(line: str, label: str | None = None) -> None:
    """Print one whole line (prefixed by [label]) even with several launchers in threads."""
    with _stdout_lock:
        print(f"[{label}] {line}" if label else line, flush=True)


class StateFile:
    def __init__(self, run_dir: Path):
        self.path = run_dir / "launch_state.json"
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

    if detach and cfg.executor.get("name", "local") != "slurm":
        raise UsageError("--detach: needs executor.name=slurm (the local executor has no job dependencies)")
    run_dir = Path(cfg.run_dir)
    if dry_run:
        return _run(cfg, True, label, False)
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):
        return _run(cfg, False, label, detach)


def _run(cfg: RunConfig, dry_run: bool, label: str | None, detach: bool) -> dict:
    run_dir = Path(cfg.run_dir)
    say = functools.partial(emit, label=label)
    steps = plan(cfg)
    if not dry_run:
        write_json(run_dir / "run_config.json", dataclasses.asdict(cfg), if_changed=True)
    state = StateFile(run_dir)
    result = {}
    chain: list[str] = []  # detach: the jobs of the step before, which the next one depends on
    for step in steps:
        if not chain and step.done():  # after a submitted step, every later one runs again
            result[step.name] = "done"
            if not dry_run and state.state.get(step.name, {}).get("state") != "done":
                state.set(step.name, state="done")
            say(f"{step.name:<20} done")
            continue
        if dry_run:
            params = slurm_parameters(cfg, step) if cfg.executor.get("name") == "slurm" else \
                {"timeout_min": int(cfg.executor.get("timeout_min", 600))}
            say(f"{step.name:<20} would run {len(step.args)} task(s) on {cfg.executor.get('name', 'local')}: "
                f"{params}")
            result[step.name] = "planned"
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
            outputs = [j.result() for j in jobs]
        except Exception as exc:
            state.set(step.name, state="failed", error=str(exc).splitlines()[-1][:300] if str(exc) else "")
            raise RuntimeError(f"step {step.name} failed; see {jobs[0].paths.stderr}") from exc
        state.set(step.name, state="done", output=outputs if len(outputs) > 1 else outputs[0])
        say(f"{step.name:<20} finished in {time.monotonic() - started:.0f} s")
        result[step.name] = "done"
    return result


def _submit(cfg: RunConfig, step: Step, state: StateFile, after: list[str] | None = None) -> list:
    executor = make_executor(cfg, step, after)
    if len(step.args) == 1:
        jobs = [executor.submit(step.fn, *step.args[0])]
    else:
        jobs = executor.map_array(step.fn, *zip(*step.args))
    state.set(step.name, state="running", job_ids=[j.job_id for j in jobs], logs=[str(j.paths.stderr) for j in jobs],
              after=after or [])
    return jobs


def _earlier_jobs_alive(cfg: RunConfig, step: Step, state: StateFile) -> list[str]:
    """The jobs an earlier launch submitted for `step` that are still queued or running."""
    from launch.jobs import live_jobs

    record = state.state.get(step.name, {})
    if record.get("state") != "running":
        return []
    return live_jobs(cfg.executor.get("name", "local"), record.get("job_ids", []), Path(cfg.run_dir))


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
    executor = cfg.executor.get("name", "local")
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
    from launch.config import RunConfig

    cfg_path = Path(run_dir) / "run_config.json"
    if not cfg_path.is_file():
        from common.cli import UsageError
        raise UsageError(f"{cfg_path}: missing; not a run folder (python -m launch run writes it)")
    cfg = RunConfig(**json.loads(cfg_path.read_text()))
    recorded = StateFile(Path(run_dir)).state
    rows = []
    for step in plan(cfg):
        rec = recorded.get(step.name, {})
        state = "done" if step.done() else rec.get("state", "pending")
        rows.append((step.name, state, ",".join(rec.get("job_ids", [])), (rec.get("logs") or [""])[0]))
    return rows
