"""The slurm executor against a real Slurm (two nodes on this machine: scripts/slurm_local.sh,
which ./run.sh test starts when run as root, as CI does)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

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


def test_a_rerun_waits_for_the_slurm_job_of_a_killed_launcher(slurm, tmp_path, tiny_shards):
    """The launcher killed (a login-node session lost) while its training job runs on Slurm: the
    rerun finds the job in the queue and waits for it instead of submitting the stage again."""
    run_dir = tmp_path / "run"
    args = ["--config", str(REPO / "configs" / "tiny_mcl.yaml"), f"run_dir={run_dir}", f"data={tiny_shards}",
            "mmvp=", "stages=1", "train.steps=30", "train.log_every=1", "executor.name=slurm",
            "executor.slurm.cpus_per_task=1", "executor.timeout_min=20"]
    check_a_rerun_waits_for_the_job_of_a_killed_launcher(args, run_dir, "slurm", steps=30)


def _job_environments(run_dir, job_ids: list[str]) -> list[str]:
    """submitit's JobEnvironment line of every task of these jobs (from their logs)."""
    found = []
    for job in job_ids:
        folder = run_dir / "logs" / job
        for log in sorted(folder.glob("*_log.out")):
            found += re.findall(r"JobEnvironment\((job_id=.*)\)\s*$", log.read_text(), flags=re.M)
    return found


def test_the_dag_runs_detached_and_two_node_training_matches_one_node(slurm, tmp_path, tiny_shards, tiny_spec):
    """On the 2-node Slurm (two slurmd on this host), the same 2-stage MCL run twice at once:
    - `launch run --detach` submits the whole DAG (afterok dependencies, arrays), its training on
      2 nodes x 1 task, and exits; Slurm runs it without a launcher; `launch run` then attaches
      and waits for it, submitting nothing twice;
    - the same run in the foreground, its training on 1 node x 2 tasks.
    Every step's allocation follows the plan (train over both nodes, embed and assign as arrays
    of one-node tasks, the rest one task); the two-node ranks sit on different nodes; both runs
    give the same losses and clusters."""
    from shards.mmvp_writer import write_benchmark
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()
    assert len(set(nodes)) >= 2, f"the test Slurm has one node ({nodes}): rerun scripts/slurm_local.sh"
    bench = write_benchmark(tmp_path / "mmvp", tiny_spec, pairs=2, seed=1)
    common = ["--config", str(REPO / "configs" / "tiny_mcl.yaml"), f"data={tiny_shards}",
              "executor.name=slurm", "executor.slurm.cpus_per_task=1", "executor.timeout_min=20",
              "train.steps=6", "train.log_every=1", "train.save_every=6"]
    run_dir, one_dir = tmp_path / "two_nodes", tmp_path / "one_node"
    args = [*common, f"run_dir={run_dir}", f"mmvp={bench}", "executor.slurm.nodes=2"]

    r = run_cli("launch", "run", *args, "--detach")
    assert r.returncode == 0, r.stderr[-4000:]
    forecast, *lines = r.stdout.splitlines()
    assert forecast.startswith("forecast") and "stage 2 on K=[4] (flat) at global batch 64" in forecast, forecast
    assert len(lines) == 8 and all(" submitted job(s) " in line for line in lines), r.stdout
    assert " after " not in lines[0] and all(" after " in line for line in lines[1:])
    state = json.loads((run_dir / "launch_state.json").read_text())
    train, embed = state["stage1/train"]["job_ids"][0], state["stage1/embed"]["job_ids"]
    array = embed[0].split("_")[0]
    script = (run_dir / "logs" / array / f"{array}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{train}\n" in script and "#SBATCH --kill-on-invalid-dep=yes" in script

    reference = subprocess.Popen([sys.executable, "-m", "launch", "run", *common, f"run_dir={one_dir}", "mmvp=",
                                  "executor.slurm.steps.train.tasks_per_node=2"],
                                 cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        r = run_cli("launch", "run", *args, timeout=900)  # attaches: waits for each step's queued job in turn
        out, err = reference.communicate(timeout=900)
    finally:
        reference.kill()
    assert reference.returncode == 0, f"one node: {err[-4000:]}"
    assert r.returncode == 0, r.stderr[-4000:]
    # attached at once: it waits for the steps still queued or running (how many depends on speed)
    assert " of an earlier launch" in r.stdout, r.stdout
    assert " running job(s) " not in r.stdout  # nothing submitted twice
    for path in ("stage1/sidecars/00000.parquet", "stage2/done.json", "merged.pt", "eval/mmvp_summary.json"):
        assert (run_dir / path).exists(), path
    r = run_cli("launch", "status", str(run_dir))
    assert r.returncode == 0 and r.stdout.count(" done ") == 8

    state = json.loads((run_dir / "launch_state.json").read_text())
    for stage in (1, 2):
        train = state[f"stage{stage}/train"]["job_ids"]
        envs = _job_environments(run_dir, train)
        assert sorted(re.search(r"node=(\d+\(\d+\))", e).group(1) for e in envs) == ["0(2)", "1(2)"], envs
        assert sorted(re.search(r"global_rank=(\d+\(\d+\))", e).group(1) for e in envs) == ["0(2)", "1(2)"], envs
        assert all(f"job_id={train[0]}," in e for e in envs)  # ran as that Slurm job
        script = (run_dir / "logs" / train[0] / f"{train[0]}_submission.sh").read_text()
        assert "#SBATCH --nodes=2\n" in script and "#SBATCH --ntasks-per-node=1\n" in script
        assert "#SBATCH --cpus-per-task=1\n" in script
        logs = "".join(p.read_text() for p in (run_dir / "logs" / train[0]).glob("*_log.err"))
        ranks = re.search(r"world size 2: rank 0 on (\S+), rank 1 on (\S+)", logs)
        assert ranks and ranks.group(1) != ranks.group(2) and {ranks.group(1), ranks.group(2)} <= set(nodes), logs[-2000:]
    for step in ("stage1/embed", "stage1/assign"):
        jobs = state[step]["job_ids"]
        assert len(jobs) == 2 and jobs[0].endswith("_0") and jobs[1].endswith("_1")  # an array of 2 tasks
        envs = _job_environments(run_dir, jobs)
        assert len(envs) == 2 and all("node=0(1)" in e and "global_rank=0(1)" in e for e in envs), envs
    for step in ("stage1/cluster", "stage1/reduce", "merge"):
        envs = _job_environments(run_dir, state[step]["job_ids"])
        assert len(envs) == 1 and "node=0(1)" in envs[0] and "global_rank=0(1)" in envs[0], envs

    one_state = json.loads((one_dir / "launch_state.json").read_text())
    envs = _job_environments(one_dir, one_state["stage1/train"]["job_ids"])
    assert sorted(re.search(r"local_rank=(\d+\(\d+\))", e).group(1) for e in envs) == ["0(2)", "1(2)"], envs
    for stage in (1, 2):
        losses = {d.name: [json.loads(line)["loss"] for line in
                           (d / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()]
                  for d in (run_dir, one_dir)}
        assert len(losses["two_nodes"]) == 6
        assert losses["two_nodes"] == pytest.approx(losses["one_node"], rel=1e-4, abs=1e-5), losses
    import pyarrow.parquet as pq
    for sidecar in sorted((run_dir / "stage1" / "sidecars").glob("*.parquet")):
        other = one_dir / "stage1" / "sidecars" / sidecar.name
        assert pq.read_table(sidecar).to_pydict() == pq.read_table(other).to_pydict(), sidecar.name
