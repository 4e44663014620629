"""The slurm executor against a real Slurm (single node on this machine: scripts/slurm_local.sh,
which ./run.sh test starts when run as root, as CI does)."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import REPO, check_a_rerun_waits_for_the_job_of_a_killed_launcher, run_cli


@pytest.fixture(scope="module")
def slurm():
    try:
        up = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        up = None
    if up is None or up.returncode != 0 or not up.stdout.strip():
        pytest.fail("no Slurm answers here: run scripts/slurm_local.sh as root (./run.sh test does when root)")


def test_the_dag_runs_through_slurm_detached_with_dependencies_and_arrays(slurm, tmp_path, tiny_shards, tiny_spec):
    """`launch run --detach` submits the whole DAG at once (afterok dependencies, arrays) and
    exits; Slurm runs it without a launcher; `launch run` then attaches and waits for it."""
    from shards.mmvp_writer import write_benchmark
    bench = write_benchmark(tmp_path / "mmvp", tiny_spec, pairs=2, seed=1)
    run_dir = tmp_path / "run"
    args = ["--config", str(REPO / "configs" / "tiny_mcl.yaml"), f"run_dir={run_dir}", f"data={tiny_shards}",
            f"mmvp={bench}", "executor.name=slurm", "executor.slurm.cpus_per_task=1", "executor.timeout_min=20",
            "train.steps=6"]
    r = run_cli("launch", "run", *args, "--detach")
    assert r.returncode == 0, r.stderr[-4000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 8 and all(" submitted job(s) " in line for line in lines), r.stdout
    assert " after " not in lines[0] and all(" after " in line for line in lines[1:])
    state = json.loads((run_dir / "launch_state.json").read_text())
    train, embed = state["stage1/train"]["job_ids"][0], state["stage1/embed"]["job_ids"]
    array = embed[0].split("_")[0]
    script = (run_dir / "logs" / array / f"{array}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{train}\n" in script and "#SBATCH --kill-on-invalid-dep=yes" in script

    r = run_cli("launch", "run", *args)  # attaches: waits for each step's queued job in turn
    assert r.returncode == 0, r.stderr[-4000:]
    last = state["eval"]["job_ids"][0]  # the whole chain runs for minutes: eval is still queued
    assert f"eval                 waiting for job(s) {last} of an earlier launch" in r.stdout, r.stdout
    assert " running job(s) " not in r.stdout  # nothing submitted twice
    state = json.loads((run_dir / "launch_state.json").read_text())
    embed_jobs = state["stage1/embed"]["job_ids"]
    assert len(embed_jobs) == 2 and embed_jobs[0].endswith("_0") and embed_jobs[1].endswith("_1")  # an array
    job = state["stage1/train"]["job_ids"][0]
    folder = run_dir / "logs" / job
    logs = "".join(p.read_text() for p in folder.glob("*_log.*"))
    assert f"JobEnvironment(job_id={job}," in logs  # ran as Slurm job `job`
    assert "#SBATCH --cpus-per-task=1" in (folder / f"{job}_submission.sh").read_text()
    for path in ("stage1/sidecars/00000.parquet", "stage2/done.json", "merged.pt", "eval/mmvp_summary.json"):
        assert (run_dir / path).exists(), path
    r = run_cli("launch", "status", str(run_dir))
    assert r.returncode == 0 and r.stdout.count(" done ") == 8


def test_a_rerun_waits_for_the_slurm_job_of_a_killed_launcher(slurm, tmp_path, tiny_shards):
    """The launcher killed (a login-node session lost) while its training job runs on Slurm: the
    rerun finds the job in the queue and waits for it instead of submitting the stage again."""
    run_dir = tmp_path / "run"
    args = ["--config", str(REPO / "configs" / "tiny_mcl.yaml"), f"run_dir={run_dir}", f"data={tiny_shards}",
            "mmvp=", "stages=1", "train.steps=30", "train.log_every=1", "executor.name=slurm",
            "executor.slurm.cpus_per_task=1", "executor.timeout_min=20"]
    check_a_rerun_waits_for_the_job_of_a_killed_launcher(args, run_dir, "slurm", steps=30)
