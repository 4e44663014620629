"""The whole DAG through submitit's local executor: outputs, resume without work, status, dry run,
a whole run killed twice and rerun, and a training job requeued on preemption."""
from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from conftest import REPO, check_a_rerun_waits_for_the_job_of_a_killed_launcher, rerun_quick_demo, run_cli


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_spec):
    from shards.mmvp_writer import write_benchmark
    return write_benchmark(tmp_path_factory.mktemp("bench") / "mmvp", tiny_spec, pairs=3, seed=1)


def _args(run_dir, tiny_shards, bench):
    return ["--config", str(REPO / "configs" / "tiny_mcl.yaml"), f"run_dir={run_dir}", f"data={tiny_shards}",
            f"mmvp={bench}"]


def test_local_executor_runs_two_stages_end_to_end_and_a_rerun_does_no_work(quick_demo):
    run_dir = quick_demo[0] / "seed0" / "mcl"
    for path in ("stage1/done.json", "stage1/sidecars/00000.parquet", "stage1/sidecars/_groups.json",
                 "stage1/clusters/grid.png", "stage2/done.json", "stage2/loader_stats.jsonl", "merged.pt",
                 "eval/mmvp_summary.json", "eval/mmvp_patterns.png", "eval/probes.json", "run_config.json"):
        assert (run_dir / path).exists(), path
    stage2 = json.loads((run_dir / "stage2" / "train_config.json").read_text())
    assert stage2["labels"] == f"sidecars:{run_dir / 'stage1'}" and stage2["pretrained"] == str(
        run_dir / "stage1" / "model")
    summary = json.loads((run_dir / "eval" / "mmvp_summary.json").read_text())
    assert list(summary) == ["mcl", "stage1", "stage2"]
    state = json.loads((run_dir / "launch_state.json").read_text())
    assert len(state["stage1/embed"]["job_ids"]) == 2 and all(s["state"] == "done" for s in state.values())

    stamps = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and "logs" not in p.parts
              and p.name != "launch_state.json"}
    r = rerun_quick_demo(quick_demo[0], "launch", "run", "--config", str(run_dir / "run_config.json"))
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
    assert "'slurm_signal_delay_s': 90" in train  # USR2 before the timeout: requeue
    embed = next(line for line in r.stdout.splitlines() if line.startswith("stage1/embed"))
    assert "2 task(s)" in embed and "'slurm_array_parallelism': 8" in embed
    assert not (run_dir / "logs").exists()

    r = run_cli("launch", "run", *_args(run_dir, tiny_shards, bench), "--dry-run", "method=ensemble", "stages=3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [line.split()[0] for line in r.stdout.splitlines()] == [
        "stage1/train", "stage2/train", "stage3/train", "merge", "eval"]  # no clustering: nothing to forecast

    r = run_cli("launch", "run", *_args(run_dir, tiny_shards, bench), "--detach")  # the local executor
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
        "--detach: needs executor.name=slurm (the local executor has no job dependencies)"), r.stderr
    assert not run_dir.exists()


def test_the_paper_recipe_plans_each_step_with_its_own_resources(tmp_path, tiny_shards):
    r = run_cli("launch", "run", "--config", str(REPO / "configs" / "paper_vitl14.yaml"), f"run_dir={tmp_path / 'r'}",
                f"data={tiny_shards}", "mmvp=", "train.train_num_samples=10000000", "executor.slurm.partition=gpu",
                "--dry-run")
    assert r.returncode == 0, r.stderr[-3000:]
    forecast = [line for line in r.stdout.splitlines() if line.startswith("forecast")]
    assert len(forecast) == 3 and all("(split) at global batch 8000" in line for line in forecast), forecast
    plan = {line.split()[0]: (int(line.split()[3]), ast.literal_eval(line.split(": ", 1)[1]))
            for line in r.stdout.splitlines() if line not in forecast}
    assert list(plan)[:6] == ["stage0/save", "stage0/embed", "stage0/cluster", "stage0/assign", "stage0/reduce",
                              "stage1/train"] and list(plan)[-1] == "merge" and len(plan) == 17
    for name, (tasks, params) in plan.items():
        kind = name.rsplit("/", 1)[-1]
        assert params["slurm_nodes"] == 1 and params["slurm_partition"] == "gpu", name
        gpus = {"train": 8, "embed": 1, "cluster": 1}.get(kind)
        assert params.get("slurm_gpus_per_node") == gpus, name
        assert params.get("slurm_tasks_per_node") == (8 if kind == "train" else None), name
        assert tasks == (32 if kind in ("embed", "assign") else 1), name
    assert plan["stage1/train"][1]["slurm_mem_gb"] == 144 and plan["stage1/assign"][1]["slurm_cpus_per_task"] == 4
    # the node's memory covers 8 ranks' prefetched uint8 batches (11 workers on 12 CPUs) many times over
    from pipeline.loader.memory import batch_bytes, plan_loader
    loader = plan_loader(None, None, 4.0, batch_bytes(1000, (3, 224, 224)), cpus=12)
    assert (loader.workers, loader.prefetch) == (11, 2) and 8 * loader.held_bytes / 1e9 < 144 / 4
    # two nodes for training alone
    r = run_cli("launch", "run", "--config", str(REPO / "configs" / "paper_vitl14.yaml"), f"run_dir={tmp_path / 'r'}",
                f"data={tiny_shards}", "mmvp=", "train.train_num_samples=10000000", "executor.slurm.nodes=2",
                "--dry-run")
    nodes = {line.split()[0]: ast.literal_eval(line.split(": ", 1)[1])["slurm_nodes"] for line in r.stdout.splitlines()
             if not line.startswith("forecast")}
    assert {n for s, n in nodes.items() if s.endswith("/train")} == {2}
    assert {n for s, n in nodes.items() if not s.endswith("/train")} == {1}
    # the steps that need no GPU off the GPU partition, in one key
    r = run_cli("launch", "run", "--config", str(REPO / "configs" / "paper_vitl14.yaml"), f"run_dir={tmp_path / 'r'}",
                f"data={tiny_shards}", "mmvp=", "train.train_num_samples=10000000", "executor.slurm.partition=gpu",
                "executor.slurm.cpu_partition=cpu", "executor.slurm.steps.merge.partition=big", "--dry-run")
    assert r.returncode == 0, r.stderr[-3000:]
    partitions = {line.split()[0]: ast.literal_eval(line.split(": ", 1)[1])["slurm_partition"]
                  for line in r.stdout.splitlines() if not line.startswith("forecast")}
    kinds = {kind: {p for s, p in partitions.items() if s.rsplit("/", 1)[-1] == kind} for kind in
             ("save", "assign", "reduce", "merge", "train", "embed", "cluster")}
    assert kinds == {"save": {"cpu"}, "assign": {"cpu"}, "reduce": {"cpu"}, "merge": {"big"}, "train": {"gpu"},
                     "embed": {"gpu"}, "cluster": {"gpu"}}, partitions
    # every stage fine-tunes the OpenAI weights, with QuickGELU from the tag
    from launch.config import load_run_config, stage_train_config
    from pipeline import models
    cfg = load_run_config(str(REPO / "configs" / "paper_vitl14.yaml"),
                          [f"run_dir={tmp_path / 'r'}", f"data={tiny_shards}", "mmvp=",
                           "train.train_num_samples=10000000"])
    stage2 = stage_train_config(cfg, 2)
    # from stage 0's saved folder (not the tag: compute nodes need no download cache), which holds
    # the tag's QuickGELU
    assert (stage2.pretrained, stage2.lock_image_unlocked_groups, stage2.lock_text, stage2.local_loss) == \
        (str(tmp_path / "r" / "stage0" / "model"), 6, True, True)
    assert stage2.labels == f"sidecars:{tmp_path / 'r' / 'stage1'}" and stage2.lr == 5e-4
    assert stage2.quick_gelu is None and stage2.augment is True
    assert models.quick_gelu_for(stage2.model, cfg.train["pretrained"]) is True


def test_later_keys_reach_every_stage_after_the_first_and_finetune_keys_win_over_them(tmp_path, tiny_shards):
    from launch.config import load_run_config, stage_train_config

    common = [f"run_dir={tmp_path / 'r'}", f"data={tiny_shards}", "mmvp=", "stages=3", "train.steps=7",
              "train.lr=1e-3", "later.steps=11", "later.lr=2e-3"]
    scratch = load_run_config(str(REPO / "configs" / "tiny_mcl.yaml"), common + ["stage_init=scratch"])
    stages = [stage_train_config(scratch, s) for s in (1, 2, 3)]
    assert [(c.steps, c.lr) for c in stages] == [(7, 1e-3), (11, 2e-3), (11, 2e-3)]
    assert [c.pretrained for c in stages] == [None] * 3 and [c.seed for c in stages] == [0, 1, 2]
    tuned = load_run_config(str(REPO / "configs" / "tiny_mcl.yaml"),
                            common + ["stage_init=previous", "finetune.lr=3e-4"])
    stages = [stage_train_config(tuned, s) for s in (1, 2, 3)]
    assert [(c.steps, c.lr) for c in stages] == [(7, 1e-3), (11, 3e-4), (11, 3e-4)]
    assert stages[2].pretrained == str(tmp_path / "r" / "stage2" / "model")
    # with a pretrained stage 0, stage 1 fine-tunes it and takes `finetune` but not `later`
    paper = load_run_config(str(REPO / "configs" / "paper_vitl14.yaml"),
                            [f"run_dir={tmp_path / 'p'}", f"data={tiny_shards}", "mmvp=", "train.steps=7",
                             "train.train_num_samples=10000000", "later.steps=11", "finetune.wd=0.1"])
    stages = [stage_train_config(paper, s) for s in (1, 2)]
    stage0 = str(tmp_path / "p" / "stage0" / "model")
    assert [(c.steps, c.wd, c.pretrained) for c in stages] == [(7, 0.1, stage0), (11, 0.1, stage0)]
    # the stage trained on the first clustering takes later's batch size: its groups are forecast against it
    from common.cli import UsageError
    with pytest.raises(UsageError, match=r"stage 2 \(N=600, K=\[4\]\): 100.0% of samples would fall back to a "
                                         r"coarser label at global batch 512"):
        load_run_config(str(REPO / "configs" / "tiny_mcl.yaml"), common + ["later.batch_size=512"])
    with pytest.raises(UsageError, match=r"later\.pretrained: an ensemble trains every stage from scratch"):
        load_run_config(str(REPO / "configs" / "tiny_mcl.yaml"), common + ["method=ensemble", "later.pretrained=openai"])


def test_the_whole_config_is_validated_first(tmp_path):
    r = run_cli("launch", "run", "--config", str(REPO / "configs" / "tiny_mcl.yaml"), f"run_dir={tmp_path}",
                "data=/nonexistent/{0..3}.tar", "clusters=1", "train.model=no-such-net", "mmvp=/nowhere",
                "sugarcrepe=/nowhere/sc", "method=bagging", "finetune.learning_rate=1")
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()[-1]
    for problem in ("data: /nonexistent/0.tar: no such shard", "mmvp: /nowhere/Questions.csv missing",
                    "sugarcrepe: /nowhere/sc: not a folder",
                    "clusters: every K must be an integer >= 2", "train.model: unknown architecture 'no-such-net'",
                    "method: must be mcl or ensemble, got 'bagging'",
                    "finetune.learning_rate: unknown key"):
        assert problem in err
    assert "Traceback" not in r.stderr and not list(tmp_path.iterdir())


def test_yaml_1_1_numbers_in_a_run_config_and_on_the_command_line_reach_training_as_numbers(tmp_path, tiny_shards):
    """YAML 1.1 (PyYAML) reads `1e-3` as a string: it must still train, from the file and from an override."""
    config = tmp_path / "run.yaml"
    text = (REPO / "configs" / "tiny_mcl.yaml").read_text()
    assert "lr: 1.0e-3" in text
    config.write_text(text.replace("lr: 1.0e-3", "lr: 1e-3"))
    run_dir = tmp_path / "run"
    r = run_cli("launch", "run", "--config", str(config), f"run_dir={run_dir}", f"data={tiny_shards}", "mmvp=",
                "method=ensemble", "stages=1", "train.steps=3", "train.wd=2e-2")
    assert r.returncode == 0, r.stderr[-3000:]
    trained = json.loads((run_dir / "stage1" / "train_config.json").read_text())
    assert trained["lr"] == 0.001 and trained["wd"] == 0.02
    assert json.loads((run_dir / "stage1" / "done.json").read_text())["steps"] == 3
    # the same run folder with another training config: refused before anything is written
    recorded = (run_dir / "run_config.json").read_bytes()
    r = run_cli("launch", "run", "--config", str(config), f"run_dir={run_dir}", f"data={tiny_shards}", "mmvp=",
                "method=ensemble", "stages=1", "train.steps=3", "train.wd=3e-2")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
        "stage1/done.json: this stage was trained with another config; use another `out`"), r.stderr[-3000:]
    assert (run_dir / "run_config.json").read_bytes() == recorded


def test_a_bad_value_fails_before_submission_with_one_line(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    r = run_cli("launch", "run", "--config", str(REPO / "configs" / "tiny_mcl.yaml"), f"run_dir={run_dir}",
                f"data={tiny_shards}", "mmvp=", "train.lr=abc")
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("train.lr: expected a number, got 'abc'"), r.stderr[-3000:]
    assert not run_dir.exists()


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=-3", "train.batch_size: must be >= 1, got -3"),
    ("finetune.warmup=-1", "finetune.warmup: must be >= 0, got -1"),
    ("later.steps=0", "later.steps: must be >= 1, got 0"),
    ("later.stepz=600", "later.stepz: unknown key"),
    ("executor.tasks=0", "executor.tasks: must be >= 1, got 0"),
    ("executor.slurm.gpus=4", "executor.slurm.gpus: unknown key"),
    ("embed.batch_size=0", "embed.batch_size: must be >= 1, got 0"),
    ("stages=two", "stages: expected an integer, got 'two'"),
    ("train.data=x", "train.data: set by the run for each stage"),
    ("executor.slurm.steps.assign.gpus_per_node=1", "executor.slurm.steps.assign.gpus_per_node: the assign step runs "
                                                    "on the CPU"),
    ("executor.slurm.steps.embed.nodes=2", "executor.slurm.steps.embed.nodes: the embed step runs on one node"),
    ("executor.slurm.steps.trian.mem_gb=8", "executor.slurm.steps.trian: unknown step"),
    ("executor.slurm.steps.train.gpus=8", "executor.slurm.steps.train.gpus: unknown key"),
    ("benchmarks=[wds/cars=/nowhere]", "benchmarks[0]: /nowhere/test/nshards.txt: missing"),
    ("benchmarks=[nosuchset]", "benchmarks[0]: --dataset nosuchset=root: Unsupported dataset: nosuchset"),
    ("train.report_to=[tensorboard,comet]", "train.report_to: unknown tracker 'comet'"),
])
def test_every_key_of_the_run_config_is_typed_and_validated_by_name(tmp_path, tiny_shards, override, message):
    from common.cli import UsageError
    from launch.config import load_run_config

    with pytest.raises(UsageError, match=re.escape(message)):
        load_run_config(str(REPO / "configs" / "tiny_mcl.yaml"), [f"run_dir={tmp_path}", f"data={tiny_shards}",
                                                                   "mmvp=", override])


def test_a_failed_step_is_one_line_with_the_job_s_own_error(tmp_path):
    import operator

    import submitit

    from launch.run import _last_line
    executor = submitit.LocalExecutor(folder=tmp_path / "logs")
    executor.update_parameters(timeout_min=5)
    job = executor.submit(operator.getitem, {}, "no pseudo-label for key 000010007")  # a KeyError in the job
    with pytest.raises(Exception) as failure:
        job.result()
    assert _last_line(failure.value) == "KeyError: 'no pseudo-label for key 000010007'"


def _launch(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launch", "run", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _state(run_dir, step: str) -> str | None:
    try:
        return json.loads((run_dir / "launch_state.json").read_text()).get(step, {}).get("state")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_a_run_killed_in_training_and_in_assign_reruns_to_the_clean_result(tmp_path, quick_demo):
    """SIGKILL to the launcher and every job process, twice; the same command then finishes the run
    with the sidecars, models and scores of the clean run (the quick demo's MCL run)."""
    from pipeline.stage import StageDir
    from shards.reader import expand_urls
    import pyarrow.parquet as pq

    clean_run = quick_demo[0] / "seed0" / "mcl"
    config = json.loads((clean_run / "run_config.json").read_text())
    run_dir = tmp_path / "run"
    # the clean run's MMVP scores are compared; its probes and zero-shot sets are left out here
    args = ["--config", str(clean_run / "run_config.json"), f"run_dir={run_dir}", "probes=", "benchmarks=[]"]
    proc = _launch(*args)
    _wait_for(lambda: list((run_dir / "stage1" / "checkpoints").glob("step_*.pt")), proc, "a stage-1 checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "stage1" / "done.json").exists(), "stage 1 finished before it could be killed"

    proc = _launch(*args)
    _wait_for(lambda: _state(run_dir, "stage1/assign") == "running", proc, "the assign step")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "stage1" / "clusters" / "assign_stats.json").exists()
    assert not (run_dir / "stage2").exists()

    r = run_cli("launch", "run", *args)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "stage1/train         done" in r.stdout and "stage1/assign        running" in r.stdout
    for shard in expand_urls(config["data"]):
        ours = pq.read_table(StageDir(run_dir / "stage1").sidecar(shard))
        clean = pq.read_table(StageDir(clean_run / "stage1").sidecar(shard))
        assert ours.column("key").to_pylist() == clean.column("key").to_pylist()
        assert ours.column("cluster").to_pylist() == clean.column("cluster").to_pylist(), shard
    for stage in ("stage1", "stage2"):
        ours = torch.load(run_dir / stage / "model" / "open_clip_pytorch_model.bin", weights_only=True)
        clean = torch.load(clean_run / stage / "model" / "open_clip_pytorch_model.bin", weights_only=True)
        assert ours.keys() == clean.keys()
        assert all(torch.allclose(ours[k], clean[k], atol=1e-5) for k in ours), stage
    ours, clean = (json.loads((d / "eval" / "mmvp_summary.json").read_text()) for d in (run_dir, clean_run))
    assert ours == clean


def test_training_is_requeued_on_timeout_and_resumes_from_its_checkpoint(tmp_path, tiny_shards):
    """USR2 (what Slurm and the local executor send before a timeout) to the training task: with a
    1-minute limit submitit counts it as a timeout, which requeues only a checkpointable call; the
    local executor requeues it, and training resumes from its checkpoint, not from step 0."""
    run_dir = tmp_path / "run"
    proc = _launch("--config", str(REPO / "configs" / "tiny_mcl.yaml"), f"run_dir={run_dir}",
                   f"data={tiny_shards}", "mmvp=", "stages=1", "train.steps=40", "train.save_every=5",
                   "train.log_every=1", "executor.timeout_min=1", "executor.signal_delay_s=5")
    ckpts = run_dir / "stage1" / "checkpoints"
    _wait_for(lambda: list(ckpts.glob("step_*.pt")), proc, "a checkpoint")
    def is_task(p):  # not its DataLoader workers, which come and go
        try:
            return "submitit.core._submit" in " ".join(p.cmdline()) \
                and "submitit.local._local" in " ".join(p.parent().cmdline())
        except (psutil.NoSuchProcess, AttributeError):  # ended meanwhile (its parent: None)
            return False
    tasks = [p for p in psutil.Process(proc.pid).children(recursive=True) if is_task(p)]
    assert len(tasks) == 1, tasks
    tasks[0].send_signal(signal.SIGUSR2)
    assert proc.wait(timeout=300) == 0
    record = json.loads((run_dir / "stage1" / "done.json").read_text())
    assert record["steps"] == 40
    log = "".join(p.read_text() for p in (run_dir / "logs").rglob("*_log.err"))
    assert "this job is timed-out" in log and "Requeued job" in log
    resumed = re.findall(r"resumed from \S+ at step (\d+)", log)
    assert len(resumed) == 1 and int(resumed[0]) >= 5, log[-3000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))


def test_a_rerun_waits_for_the_job_a_killed_launcher_left_running(tmp_path, tiny_shards):
    """SIGKILL to the launcher alone: its training job lives on (submitit's local controller
    outlives it). While the launcher runs, a second one of the same run is refused; after it is
    killed, the rerun waits for the orphaned job instead of training the stage a second time."""
    run_dir = tmp_path / "run"
    args = ["--config", str(REPO / "configs" / "tiny_mcl.yaml"), f"run_dir={run_dir}", f"data={tiny_shards}",
            "mmvp=", "stages=1", "train.steps=30", "train.log_every=1"]
    out = check_a_rerun_waits_for_the_job_of_a_killed_launcher(args, run_dir, "local", steps=30)
    assert "stage1/train         finished by the earlier launch's job(s)" in out
    assert (run_dir / "merged.pt").is_file()

