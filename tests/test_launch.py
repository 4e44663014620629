"""The whole DAG through submitit's local executor: outputs, resume without work, status, dry run."""
from __future__ import annotations

import json

import pytest

from conftest import REPO, run_cli


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_spec):
    from shards.mmvp_writer import write_benchmark
    return write_benchmark(tmp_path_factory.mktemp("bench") / "mmvp", tiny_spec, pairs=3, seed=1)


def _args(run_dir, tiny_shards, bench):
    return ["--config", str(REPO / "configs" / "tiny_mcl.yaml"), f"run_dir={run_dir}", f"data={tiny_shards}",
            f"mmvp={bench}"]


def test_local_executor_runs_two_stages_end_to_end_and_a_rerun_does_no_work(tmp_path, tiny_shards, bench):
    run_dir = tmp_path / "run"
    r = run_cli("launch", "run", *_args(run_dir, tiny_shards, bench))
    assert r.returncode == 0, r.stderr[-4000:]
    for path in ("stage1/done.json", "stage1/sidecars/00000.parquet", "stage1/sidecars/_groups.json",
                 "stage1/clusters/grid.png", "stage2/done.json", "stage2/loader_stats.jsonl", "merged.pt",
                 "eval/mmvp_summary.json", "eval/mmvp_patterns.png", "run_config.json"):
        assert (run_dir / path).exists(), path
    stage2 = json.loads((run_dir / "stage2" / "train_config.json").read_text())
    assert stage2["labels"] == f"sidecars:{run_dir / 'stage1'}" and stage2["seed"] == 1
    summary = json.loads((run_dir / "eval" / "mmvp_summary.json").read_text())
    assert list(summary) == ["mcl", "stage1", "stage2"]
    state = json.loads((run_dir / "launch_state.json").read_text())
    assert len(state["stage1/embed"]["job_ids"]) == 2 and all(s["state"] == "done" for s in state.values())

    stamps = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and "logs" not in p.parts
              and p.name != "launch_state.json"}
    r = run_cli("launch", "run", *_args(run_dir, tiny_shards, bench))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "running" not in r.stdout and r.stdout.count(" done") == 8
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    r = run_cli("launch", "status", str(run_dir))
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert len(lines) == 8 and all(" done " in line for line in lines)
    assert "stage1/assign" in lines[3] and "logs/" in lines[3]


def test_dry_run_prints_the_slurm_plan_without_submitting(tmp_path, tiny_shards, bench):
    run_dir = tmp_path / "run"
    r = run_cli("launch", "run", *_args(run_dir, tiny_shards, bench), "--dry-run", "executor.name=slurm",
                "executor.slurm.partition=gpu", "executor.slurm.gpus_per_node=4", "executor.slurm.account=mcl")
    assert r.returncode == 0, r.stderr[-3000:]
    train = next(line for line in r.stdout.splitlines() if line.startswith("stage1/train"))
    assert "'slurm_partition': 'gpu'" in train and "'slurm_gpus_per_node': 4" in train
    assert "'slurm_tasks_per_node': 4" in train and "'slurm_account': 'mcl'" in train
    embed = next(line for line in r.stdout.splitlines() if line.startswith("stage1/embed"))
    assert "2 task(s)" in embed and "'slurm_array_parallelism': 8" in embed
    assert not (run_dir / "logs").exists()


def test_the_whole_config_is_validated_first(tmp_path):
    r = run_cli("launch", "run", "--config", str(REPO / "configs" / "tiny_mcl.yaml"), f"run_dir={tmp_path}",
                "data=/nonexistent/{0..3}.tar", "clusters=1", "train.model=no-such-net", "mmvp=/nowhere")
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()[-1]
    for problem in ("data: /nonexistent/0.tar: no such shard", "mmvp: /nowhere/Questions.csv missing",
                    "clusters: every K must be an integer >= 2", "train.model: unknown architecture 'no-such-net'"):
        assert problem in err
    assert "Traceback" not in r.stderr and not list(tmp_path.iterdir())
