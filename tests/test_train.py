"""The stage training job: falling loss under DDP and DeepSpeed, exact resume, plain open_clip output."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest

from conftest import REPO, run_cli, write_raw_tar

COMMON = ["model=mcl-tiny-vit", "batch_size=32", "warmup=2", "lr=1e-3", "log_every=5", "threads=1",
          "shuffle_buffer=200"]


def _losses(stage):
    return [json.loads(line)["loss"] for line in (stage / "metrics.jsonl").read_text().splitlines()]


def _torchrun(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "pipeline.train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _falls(losses):
    k = max(3, len(losses) // 4)
    return sum(losses[-k:]) / k < sum(losses[:k]) / k - 0.1


def test_single_process_run_and_plain_open_clip_artifact(tmp_path, tiny_shards):
    stage = tmp_path / "stage1"
    r = run_cli("pipeline.train", f"data={tiny_shards}", f"out={stage}", "steps=24", "workers=2",
                "save_every=10", *COMMON)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = _losses(stage)
    assert len(losses) == 24 and _falls(losses), losses
    assert "samples/s" in r.stderr and "eta" in r.stderr and "eff_neg 31.0" in r.stderr
    assert sorted(p.name for p in (stage / "checkpoints").iterdir()) == ["step_00000020.pt", "step_00000024.pt"]
    done = json.loads((stage / "done.json").read_text())
    assert done["steps"] == 24
    # the model loads with open_clip alone, both ways, in a process without the project
    model_dir = stage / "model"
    code = textwrap.dedent(f"""
        import sys, torch, open_clip
        assert not any('work/main' in p and p.endswith('main') for p in sys.path[1:])
        a = open_clip.create_model("local-dir:{model_dir}")
        open_clip.add_model_config("{model_dir}/mcl-tiny-vit.json")
        b = open_clip.create_model("mcl-tiny-vit", pretrained="{model_dir}/open_clip_pytorch_model.bin")
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(a.encode_image(x), b.encode_image(x))
        ckpt = torch.load("{stage}/checkpoints/step_00000024.pt", weights_only=True)
        for k, v in b.state_dict().items():
            torch.testing.assert_close(v, ckpt["state_dict"][k])
        assert all(g["fused"] for g in ckpt["optimizer"]["param_groups"])  # fused AdamW by default
        print("OK")
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
    # a finished stage is skipped on rerun
    r = run_cli("pipeline.train", f"data={tiny_shards}", f"out={stage}", "steps=24", "workers=2",
                "save_every=10", *COMMON)
    assert r.returncode == 0 and "stage already trained" in r.stderr
    assert len(_losses(stage)) == 24


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_two_process_training_lowers_the_loss(tmp_path, tiny_shards, engine):
    stage = tmp_path / engine
    extra = ["engine=deepspeed", "zero_stage=2"] if engine == "deepspeed" else []
    r = _torchrun(f"data={tiny_shards}", f"out={stage}", "steps=20", "workers=1", "save_every=10",
                  "labels=json:attributes.count", *COMMON, *extra)
    assert r.returncode == 0, r.stderr[-4000:]
    losses = _losses(stage)
    assert len(losses) == 20 and _falls(losses), losses
    # global batch 64 over 2 ranks, masked to same-count pairs (2 counts): about 31 negatives, not 63
    eff = [json.loads(line)["effective_negatives"] for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert all(20 < e < 45 for e in eff), eff
    assert (stage / "model" / "open_clip_pytorch_model.bin").is_file()
    if engine == "deepspeed":
        assert "ZeRO-2" in r.stderr and (stage / "checkpoints" / "step_00000020").is_dir()


def test_a_bare_srun_environment_on_two_nodes_forms_one_process_group(tmp_path, tiny_shards):
    """What `srun -N 2 --ntasks-per-node 1 python -m pipeline.train ...` gives each task (no
    torchrun, no MASTER_ADDR): ranks from SLURM_PROCID, the rendezvous on the first host of
    SLURM_JOB_NODELIST. Two processes given that environment by hand (both "nodes" are this host)."""
    import socket

    from pipeline.trainer.distributed import rendezvous
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_JOB_NODELIST", "gpu-a[07-08],gpu-b3")
        mp.setenv("SLURM_JOB_ID", "123456")
        first = rendezvous()
        assert first["MASTER_ADDR"] == "gpu-a07" and 20000 <= int(first["MASTER_PORT"]) < 40000
        mp.setenv("SLURM_STEP_ID", "1")  # a second training step of the same allocation
        mp.setenv("SLURM_STEP_NODELIST", "gpu-b3")
        second = rendezvous()
        assert second["MASTER_ADDR"] == "gpu-b3" and second["MASTER_PORT"] != first["MASTER_PORT"]
    stage = tmp_path / "srun"
    busy = socket.socket()  # torch's default port taken: the job's own port must be used
    busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        busy.bind(("127.0.0.1", 29500))
        busy.listen()
    except OSError:
        pass  # someone else holds it: the same situation
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    procs = []
    for rank in (0, 1):
        env = {**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "SLURM_JOB_ID": "4242",
               "SLURM_JOB_NODELIST": "localhost", "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "2",
               "SLURM_PROCID": str(rank), "SLURM_NODEID": str(rank), "SLURM_LOCALID": "0"}
        procs.append(subprocess.Popen([sys.executable, "-m", "pipeline.train", f"data={tiny_shards}", f"out={stage}",
                                       "steps=4", "workers=0", "save_every=4", *COMMON], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    busy.close()
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert "global batch 64" in outs[0][1]  # 2 ranks x 32
    assert len(_losses(stage)) == 4 and (stage / "done.json").is_file()


def kill_and_resume(tmp_path, args: list[str], kill_after: int, steps: int) -> tuple[list, list]:
    """Train `args` once cleanly, and once SIGKILLed after the checkpoint of step `kill_after`
    and run again; returns (the clean run's losses, the killed and resumed run's)."""
    clean = tmp_path / "clean"
    r = run_cli("pipeline.train", f"out={clean}", *args)
    assert r.returncode == 0, r.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", f"out={killed}", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / f"step_{kill_after:08d}.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "done.json").exists(), "the run finished before it could be killed"
    assert kill_after <= len(_losses(killed)) < steps

    r = run_cli("pipeline.train", f"out={killed}", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    return _losses(clean), _losses(killed)


def test_killed_run_resumes_to_the_same_losses(tmp_path, tiny_shards):
    a, b = kill_and_resume(tmp_path, [f"data={tiny_shards}", "steps=30", "workers=2", "save_every=6", *COMMON], 12, 30)
    assert len(a) == len(b) == 30
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, list(zip(a, b))


def test_a_stop_signal_checkpoints_the_step_it_arrives_at_and_the_rerun_ends_as_an_uninterrupted_run(
        tmp_path, tiny_shards):
    """Slurm's warning before the time limit (USR2) or a preemption (TERM), sent to the whole
    process group as Slurm does (DataLoader workers too), with save_every beyond the stage: the
    checkpoint written at the signal is the only one, and the rerun loses no step."""
    args = [f"data={tiny_shards}", "steps=24", "workers=2", "save_every=1000", *COMMON]
    clean = tmp_path / "clean"
    r = run_cli("pipeline.train", f"out={clean}", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    for sig, after in ((signal.SIGUSR2, 6), (signal.SIGTERM, 14)):
        stopped = tmp_path / signal.Signals(sig).name
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", f"out={stopped}", *args], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.time() + 300
        while not (stopped / "metrics.jsonl").is_file() or len(_losses(stopped)) < after:
            assert proc.poll() is None and time.time() < deadline, "training ended before the signal"
            time.sleep(0.05)
        os.killpg(proc.pid, sig)
        err = proc.communicate(timeout=300)[1]
        assert proc.returncode == -sig, err[-3000:]
        saved = sorted((stopped / "checkpoints").glob("step_*.pt"))
        assert len(saved) == 1, saved
        step = int(saved[0].stem.split("_")[1])
        assert after <= step < 24 and len(_losses(stopped)) == step
        assert f"{signal.Signals(sig).name}: checkpoint of step {step} written; stopping" in err
        assert not (stopped / "done.json").exists()

        r = run_cli("pipeline.train", f"out={stopped}", *args)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"resumed from {saved[0]} at step {step}" in r.stderr
        a, b = _losses(clean), _losses(stopped)
        assert len(a) == len(b) == 24
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, list(zip(a, b))


def test_broken_samples_are_skipped_and_counted_across_workers(tmp_path, tiny_shards):
    import tarfile
    data = tmp_path / "shards"
    data.mkdir()
    for i, shard in enumerate(["00000", "00001", "00002"]):
        with tarfile.open(tiny_shards / f"{shard}.tar") as tf:
            members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
        # shard i loses the caption of its 6th sample and, in shards 1 and 2, garbles its 8th image
        members = [(n, os.urandom(200) if i and n.endswith("0007.jpg") else b) for n, b in members
                   if not n.endswith("0005.txt")]
        write_raw_tar(data / f"{shard}.tar", members)
    stage = tmp_path / "stage"
    # one epoch of 32 batches of 16 per worker: worker 0 reads shards 0 and 2 (398 usable samples)
    # and starts over, worker 1 reads shard 1 more than twice; each problem counts once
    args = [f"data={data}", f"out={stage}", "steps=64", "workers=2", "save_every=100", "train_num_samples=1000",
            *COMMON, "batch_size=16"]
    r = run_cli("pipeline.train", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    done = json.loads((stage / "done.json").read_text())
    assert done["data_problems"] == {"missing_caption": 3, "corrupt_image": 2}, done["data_problems"]
    assert "the loader skipped data problems: missing_caption=3, corrupt_image=2" in r.stderr
    # preempted after its last checkpoint, before done.json: the rerun trains no step and reports the same
    (stage / "done.json").unlink()
    r = run_cli("pipeline.train", *args)
    assert r.returncode == 0 and "resumed from" in r.stderr and "at step 64" in r.stderr, r.stderr[-3000:]
    assert json.loads((stage / "done.json").read_text())["data_problems"] == done["data_problems"]


def test_training_stops_past_max_problem_rate(tmp_path, tiny_shards):
    import tarfile
    data = tmp_path / "shards"
    data.mkdir()
    for shard in ("00000", "00001", "00002"):  # every 5th image garbled: 20% of the samples are corrupt
        with tarfile.open(tiny_shards / f"{shard}.tar") as tf:
            members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
        write_raw_tar(data / f"{shard}.tar", [(n, os.urandom(200) if n.endswith(("0.jpg", "5.jpg")) else b)
                                              for n, b in members])
    args = [f"data={data}", "steps=40", "workers=1", "save_every=100", "train_num_samples=600", *COMMON,
            "log_every=8"]
    r = run_cli("pipeline.train", *args, f"out={tmp_path / 'strict'}")
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "data problem rate 0.2" in errors[0] and "past max_problem_rate=0.01" in errors[0] \
        and "corrupt_image=" in errors[0], errors
    assert "Traceback" not in r.stderr and not (tmp_path / "strict" / "done.json").exists()
    r = run_cli("pipeline.train", *args, f"out={tmp_path / 'lenient'}", "max_problem_rate=0.25")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "lenient" / "done.json").read_text())["data_problems"]["corrupt_image"] > 100


def test_bad_config_is_one_line(tmp_path, tiny_shards):
    r = run_cli("pipeline.train", f"data={tiny_shards}", f"out={tmp_path}", "engine=horovod")
    assert r.returncode == 2 and "engine: must be one of ['ddp', 'deepspeed']" in r.stderr
    r = run_cli("pipeline.train", f"data={tiny_shards}", f"out={tmp_path}", "model=no-such-net")
    assert r.returncode == 2 and "unknown architecture 'no-such-net'" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def clustered_stage1(tmp_path_factory, tiny_shards):
    """A trained, embedded, clustered (K = 4) and assigned stage 1 of the tiny world."""
    from pipeline.assign import AssignSpec, assign
    from pipeline.cluster import ClusterSpec, cluster
    from pipeline.embed import EmbedSpec, embed
    stage1 = tmp_path_factory.mktemp("clustered") / "stage1"
    r = run_cli("pipeline.train", f"data={tiny_shards}", f"out={stage1}", "steps=8", "workers=1", *COMMON)
    assert r.returncode == 0, r.stderr[-3000:]
    embed(EmbedSpec(model=str(stage1 / "model"), data=str(tiny_shards), out=str(stage1), batch_size=128, workers=1),
          progress=False)
    cluster(ClusterSpec(stage=str(stage1), k=4))
    assign(AssignSpec(stage=str(stage1), stage_index=1))
    return stage1


def test_a_stage_whose_label_stage_is_clustered_anew_trains_again_and_keeps_the_old_training(
        tmp_path, tiny_shards, clustered_stage1):
    """Training's done test covers its inputs: stage 1 clustered and assigned anew makes
    stage 2 not done (not a conflict); its rerun trains again and sets the old training
    aside. A record from before inputs were recorded stays done."""
    import shutil

    from pipeline import train as T
    from pipeline.assign import AssignSpec, assign
    from pipeline.cluster import ClusterSpec, cluster
    from pipeline.trainer.config import load_train_config

    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    shutil.copytree(clustered_stage1, stage1)
    args = [f"data={tiny_shards}", f"out={stage2}", "steps=3", "workers=1", f"labels=sidecars:{stage1}", *COMMON]
    r = run_cli("pipeline.train", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = load_train_config(None, args)
    record = json.loads((stage2 / "done.json").read_text())
    assert T.is_done(cfg) and record["inputs"] == T.inputs(cfg) and '"centroids_fp"' in record["inputs"]["labels"]
    cluster(ClusterSpec(stage=str(stage1), k=4, seed=5))
    assign(AssignSpec(stage=str(stage1), stage_index=1))
    assert not T.is_done(cfg) and T.conflict(cfg) is None
    r = run_cli("pipeline.train", *args)
    assert r.returncode == 0 and "trains again" in r.stderr, r.stderr[-3000:]
    assert T.is_done(cfg) and json.loads((stage2 / "done.json").read_text())["inputs"] == T.inputs(cfg)
    [aside] = list((stage2 / "superseded").iterdir())
    assert json.loads((aside / "done.json").read_text()) == record and (aside / "model").is_dir()
    legacy = json.loads((stage2 / "done.json").read_text())
    legacy.pop("inputs")
    (stage2 / "done.json").write_text(json.dumps(legacy))
    cluster(ClusterSpec(stage=str(stage1), k=4, seed=6))
    assign(AssignSpec(stage=str(stage1), stage_index=1))
    assert T.is_done(cfg)


def test_masked_stage_on_sidecars_under_ddp(tmp_path, tiny_shards, clustered_stage1):
    """Stage 2 on the per-slot bucketed loader (`bucket=slot`), 2 ranks: ranks run out of
    same-label batches at different steps and are padded, and every epoch uses every sample once."""
    stage2 = tmp_path / "stage2"
    r = _torchrun(f"data={tiny_shards}", f"out={stage2}", "steps=30", "workers=2", "save_every=10",
                  f"labels=sidecars:{clustered_stage1}", "bucket=slot", "fallback_min_batches=0.5", *COMMON)
    assert r.returncode == 0, r.stderr[-4000:]
    records = [json.loads(line) for line in (stage2 / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 30 and all(rec["loss"] == rec["loss"] for rec in records)  # finite, no NaN
    assert max(rec["epoch"] for rec in records) >= 2
    epochs = [json.loads(line) for line in (stage2 / "loader_stats.jsonl").read_text().splitlines()]
    complete = [e for e in epochs if e["complete"]]
    assert len(complete) >= 2 and all(e["samples"] == 600 for e in complete)
    assert all(e["pure_batches"] > e["mixed_batches"] for e in complete)
    # the ranks' batches carry different labels (and mixed ones several): masked pairs
    eff = [rec["effective_negatives"] for rec in records]
    assert all(e <= 63 for e in eff) and min(eff) < 32
    assert "pure and" in r.stderr and (stage2 / "model" / "open_clip_pytorch_model.bin").is_file()


@pytest.mark.parametrize("bucket", ["global", "stream"])
def test_global_batches_under_ddp_resume_after_sigkill_to_the_same_steps(tmp_path, tiny_shards, clustered_stage1,
                                                                        bucket):
    """Stage 2 on the global-batch loader (the default for sidecar labels: random reads) and
    on the streamed one (the regroup step's files, read whole), 2 ranks x 2 workers: on pure
    steps every anchor has all 63 negatives of the gathered batch; each epoch uses every
    sample once; killed after step 5 and resumed, the run makes the same steps: the same
    labels, losses and loader counts."""
    args = [f"data={tiny_shards}", "steps=24", "workers=2", "save_every=5", f"labels=sidecars:{clustered_stage1}",
            *COMMON]
    if bucket == "stream":  # small chunks and files: bundles of uneven steps for the two workers
        from pipeline.regroup import RegroupSpec, regroup
        regroup(RegroupSpec(stage=str(clustered_stage1), data=str(tiny_shards), world_size=2, batch_size=32,
                            out=str(tmp_path / "regrouped"), chunk_steps=2, file_samples=96))
        args += ["bucket=stream", f"regrouped={tmp_path / 'regrouped'}"]
    clean = tmp_path / "clean"
    r = _torchrun(f"out={clean}", *args)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"batches {bucket}" in r.stderr
    records = [json.loads(line) for line in (clean / "metrics.jsonl").read_text().splitlines()]
    epochs = [json.loads(line) for line in (clean / "loader_stats.jsonl").read_text().splitlines()]
    complete = [e for e in epochs if e["complete"]]
    assert complete and all(e["samples"] == 600 for e in complete)  # every sample once per epoch
    pure_steps = complete[0]["pure_batches"] // 2  # counted per rank batch
    assert pure_steps > complete[0]["mixed_batches"] // 2
    eff = [rec["effective_negatives"] for rec in records if rec["epoch"] == 0]
    assert sum(e == 63 for e in eff) == pure_steps, eff  # a pure step: the whole gathered batch

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "pipeline.train", f"out={killed}", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_00000005.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    import psutil
    ranks = psutil.Process(proc.pid).children(recursive=True)  # torchrun starts them in sessions of their own
    for p in [psutil.Process(proc.pid), *ranks]:
        p.kill()
    psutil.wait_procs(ranks, timeout=30)
    proc.wait()
    assert not (killed / "done.json").exists(), "the run finished before it could be killed"
    r = _torchrun(f"out={killed}", *args)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from" in r.stderr
    resumed = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [rec["label"] for rec in resumed] == [rec["label"] for rec in records]
    assert len(resumed) == 24
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(records, resumed)) < 1e-4
    # the resumed epoch's loader line counts its steps before the kill too (checkpointed), once
    assert [json.loads(line) for line in (killed / "loader_stats.jsonl").read_text().splitlines()] == epochs


def test_the_logit_scale_clamp_holds_in_deepspeeds_fp32_master(tmp_path):
    """Under ZeRO-1 and ZeRO-2 (2 processes, gloo) the optimizer steps an fp32 master copy and
    copies it over the model: the clamp to log(100) must hold in that master too, or the scale
    drifts past the bound unseen and, once the gradient turns, stays pinned at it for steps."""
    script = tmp_path / "clamp.py"
    script.write_text(textwrap.dedent("""
        import math
        import torch
        from deepspeed.utils import safe_get_full_fp32_param
        from pipeline.trainer.distributed import cleanup, init_distributed
        from pipeline.trainer.engine import create_engine
        from pipeline.trainer.config import TrainConfig

        class Tiny(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = torch.nn.Linear(4, 4)
                self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(100) - 0.05))

        info = init_distributed("gloo")
        for stage in (1, 2):  # one engine after the other in the same process group
            cfg = TrainConfig(data="unused", out="unused", engine="deepspeed", zero_stage=stage,
                              lr=0.1, wd=0.0, batch_size=2)
            engine = create_engine(Tiny(), cfg, info)
            model, bound = engine.unwrap(), math.log(100)
            for step in range(20):
                push = -1.0 if step < 5 else 1.0  # up against the bound, then down
                loss = push * model.logit_scale.sum() + model.proj(torch.ones(2, 4)).pow(2).sum()
                engine.backward(loss)
                engine.step()
                master = safe_get_full_fp32_param(model.logit_scale).item()
                assert master <= bound + 1e-6 and model.logit_scale.item() <= bound + 1e-6, (stage, step, master)
            assert model.logit_scale.item() < bound - 0.1, (stage, model.logit_scale.item())  # it came down
            print(f"rank {info.rank} ZeRO-{stage} OK", flush=True)
        cleanup(info)
        print(f"rank {info.rank} done", flush=True)
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for attempt in (1, 2):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                            "2", str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        # Once in CI a rank died of SIGABRT ("terminate called without an active exception",
        # inside gloo/DeepSpeed, not reproduced in 16 runs here): such a death, with no Python
        # error, gets one rerun; an assertion or any other failure does not.
        native_crash = "Signal 6 (SIGABRT)" in r.stderr and "Error:" not in r.stderr.split("ChildFailedError")[0]
        if r.returncode == 0 or not native_crash:
            break
        warnings.warn(f"a rank died of SIGABRT; rerunning once. stdout: {r.stdout[-500:]}")
    for stage in (1, 2):
        assert r.stdout.count(f"ZeRO-{stage} OK") == 2, f"ZeRO-{stage}: {r.stdout[-1000:]}\n{r.stderr[-3000:]}"
    assert r.returncode == 0 and r.stdout.count(" done") == 2, f"{r.stdout[-1000:]}\n{r.stderr[-3000:]}"


def test_a_stage_trained_before_the_global_loader_is_not_taken_for_one_trained_with_it(tmp_path):
    """A done record from before `bucket=global` (no `batching`, bucket unset, sidecar labels:
    it was trained by the per-slot loader) is not done for a config that now means global
    batches: one line says how to keep it (bucket=slot) or to retrain."""
    from pipeline.train import conflict, is_done
    from pipeline.trainer.config import TrainConfig, to_dict
    cfg = TrainConfig(data="d", out=str(tmp_path / "stage2"), labels="sidecars:/runs/x/stage1")
    (tmp_path / "stage2").mkdir()
    (tmp_path / "stage2" / "done.json").write_text(json.dumps({"steps": 3, "config": to_dict(cfg)}))
    assert "trained with bucket=slot, the config asks for bucket=global" in conflict(cfg) and not is_done(cfg)
    assert is_done(TrainConfig(**{**to_dict(cfg), "bucket": "slot"}))
    (tmp_path / "stage2" / "done.json").write_text(json.dumps({"steps": 3, "config": to_dict(cfg),
                                                              "batching": "global"}))
    assert is_done(cfg) and conflict(cfg) is None


def test_dashboards_mirror_the_metrics_and_an_unreachable_wandb_does_not_stop_training(tmp_path, tiny_shards):
    """report_to=tensorboard,wandb: TensorBoard's event files (read back with tensorboard's own
    reader) and an offline W&B run (its record log) hold each step's metrics.jsonl values and
    the epoch's loader counters; a W&B that cannot be reached leaves training going."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from wandb_records import config as wandb_config
    from wandb_records import history
    from wandb_records import run as wandb_run

    stage = tmp_path / "myrun" / "stage1"
    args = [f"data={tiny_shards}", "steps=6", "workers=1", "save_every=6", "log_every=2", "labels=json:attributes.count",
            "bucket=slot", "report_to=tensorboard,wandb", *COMMON]
    r = run_cli("pipeline.train", *args, f"out={stage}", env={"WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == list(range(1, 7))
    loader = json.loads((stage / "loader_stats.jsonl").read_text().splitlines()[-1])

    events = EventAccumulator(str(stage / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for key in ("loss", "lr", "logit_scale", "samples_per_s", "effective_negatives"):
        got = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert got == [(rec["step"], pytest.approx(rec[key], rel=1e-5)) for rec in records], key
    assert [(e.step, e.value) for e in events.Scalars("loader/pure_batches")] == [(6, loader["pure_batches"])]
    for key in ("data_wait_share", "samples_per_s_per_device"):  # at log steps (COMMON: log_every=5) and the last
        got = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert got == [(rec["step"], pytest.approx(rec[key], rel=1e-5)) for rec in records if key in rec], key
        assert [step for step, _ in got] == [5, 6]
    assert "train/mfu" not in tags  # no peak known on the CPU: null in metrics.jsonl, no scalar
    assert all(rec["mfu"] is None for rec in records if "data_wait_share" in rec)
    assert {"loader/mixed_batches", "loader/fallback_samples"} <= tags and "train/time" not in tags

    logs = list((stage / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1, logs
    rows = history(logs[0])
    steps = [row for row in rows if "train/loss" in row]
    assert [row["_step"] for row in steps] == list(range(1, 7))
    for key in ("loss", "lr", "logit_scale", "effective_negatives"):
        assert [row[f"train/{key}"] for row in steps] == [pytest.approx(rec[key], rel=1e-6) for rec in records], key
    assert {k for row in rows for k in row if not k.startswith("_")} == tags  # the same keys as TensorBoard
    cfg, meta = wandb_config(logs[0]), wandb_run(logs[0])
    assert (meta.run_group, meta.display_name, meta.project) == ("myrun", "stage1", "mcl")  # grouped by the run
    assert cfg["batch_size"] == 32 and cfg["batching"] == "slot" and cfg["world_size"] == 1

    # W&B online but unreachable (a closed port): one warning, and the stage trains to the end
    other = tmp_path / "myrun" / "stage2"
    r = run_cli("pipeline.train", *args, f"out={other}", timeout=300,
                env={"WANDB_MODE": "online", "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "x" * 40,
                     "WANDB_INIT_TIMEOUT": "3"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "report_to: W&B left out, training goes on without it" in r.stderr
    assert len((other / "metrics.jsonl").read_text().splitlines()) == 6 and (other / "done.json").is_file()
    assert list((other / "tensorboard").glob("events.out.tfevents.*"))

    r = run_cli("pipeline.train", *args[:-len(COMMON) - 1], "report_to=[tensorboard,comet]", *COMMON,
                f"out={tmp_path / 'bad'}")
    assert r.returncode == 2 and "report_to: unknown tracker 'comet'" in r.stderr.strip().splitlines()[-1]


def test_metrics_show_data_wait_throughput_and_mfu(tmp_path, tiny_shards):
    """Log steps record data_wait_share, samples_per_s_per_device and mfu (here against a
    stated peak: on the CPU there is none); the loader line names workers, prefetch and
    memory; done.json holds the stage's means."""
    stage = tmp_path / "stage1"
    r = run_cli("pipeline.train", f"data={tiny_shards}", f"out={stage}", "steps=4", "log_every=2", "workers=1",
                "peak_tflops=0.5", *[a for a in COMMON if not a.startswith("log_every")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loader: 1 workers (of " in r.stderr and " MB host memory for batches" in r.stderr  # 4 x 32 x 3 x 32 x 32
    records = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    logged = [rec for rec in records if "data_wait_share" in rec]
    assert [rec["step"] for rec in logged] == [2, 4]
    for rec in logged:
        assert 0 <= rec["data_wait_share"] <= 1 and rec["samples_per_s_per_device"] > 0
        assert 0 < rec["mfu"] < 1
    done = json.loads((stage / "done.json").read_text())
    tp = done["throughput"]
    assert tp["steps"] == 4 and tp["peak_tflops"] == 0.5 and tp["flops_per_sample"] > 0
    assert 0 < tp["mfu"] < 1 and 0 <= tp["data_wait_share"] <= 1 and tp["samples_per_s_per_device"] > 0
    assert done["config"]["workers"] == 1 and done["config"]["prefetch_factor"] >= 1
    assert "throughput over 4 steps:" in r.stderr and "MFU" in r.stderr
