"""Which jobs of an earlier launch still run, and waiting for them.

A launcher can die while its jobs live on: submitit's local controllers outlive the Python
session that started them, and Slurm jobs do not depend on the login-node process at all.
Submitting the step again would start a second job writing the same outputs, so a rerun
first waits for the jobs the state file records as running. Two launchers of one run at
once would submit every later step twice: `run_lock` lets only one hold a run folder.
"""
from __future__ import annotations

import contextlib
import fcntl
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import psutil

from pipeline.stage import RunDir

ACTIVE_SLURM_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
                       "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold RUN_DIR/.launch.lock (released when the launcher ends, also when it is killed)."""
    from common.cli import UsageError

    path = RunDir(run_dir).lock
    with open(path, "a") as f:  # never written: a rerun that does no work changes no file
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{run_dir}: another launcher is running this run (it holds {path.name}); "
                             f"wait for it or stop it") from None
        yield


def live_jobs(executor: str, job_ids: Sequence[str], run_dir: Path) -> list[str]:
    """The ids among `job_ids` whose job is still pending or running."""
    if not job_ids:
        return []
    return _live_slurm(job_ids) if executor == "slurm" else _live_local(job_ids, run_dir)


def _live_local(job_ids: Sequence[str], run_dir: Path) -> list[str]:
    logs = str(RunDir(run_dir).logs)
    alive = []
    for job_id in job_ids:
        try:
            cmdline = " ".join(psutil.Process(int(job_id)).cmdline())
        except (ValueError, psutil.Error):
            continue
        # the pid may have been reused: only a submitit controller of this run's log folder counts
        if "submitit.local._local" in cmdline and logs in cmdline:
            alive.append(job_id)
    return alive


def _live_slurm(job_ids: Sequence[str]) -> list[str]:
    r = subprocess.run(["squeue", "--noheader", "--array", "--format=%i|%T", "--jobs", ",".join(job_ids)],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        if "Invalid job id" in r.stderr:  # all of them have left the queue
            return []
        raise RuntimeError(f"squeue failed (exit {r.returncode}): {r.stderr.strip()[:300]}")
    states = dict(line.split("|", 1) for line in r.stdout.split() if "|" in line)
    return [j for j in job_ids if states.get(j) in ACTIVE_SLURM_STATES]


def wait_for(alive: Callable[[], list[str]], poll_s: float = 10.0) -> None:
    """Block until `alive()` is empty."""
    while alive():
        time.sleep(poll_s)
