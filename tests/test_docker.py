"""The docker images: linted, consistent with the repo, and built and run on a real Docker
engine (scripts/docker_local.sh, which ./run.sh test runs when root, as CI does: the engine, a
debootstrapped Debian 12 base, both images; cached between runs on one machine)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))


def _hadolint() -> str:
    found = Path(sys.executable).with_name("hadolint")
    return str(found) if found.exists() else shutil.which("hadolint")


def test_dockerfiles_pass_hadolint():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]
    r = subprocess.run([_hadolint(), *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_what_exists_and_runs_the_entry_points(dockerfile):
    text = dockerfile.read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"
    assert 'ENTRYPOINT ["python", "-m"]' in text
    assert (REPO / "launch" / "__main__.py").is_file() and (REPO / "eval" / "mmvp.py").is_file()
    assert "pip install -r requirements.txt" in text


def test_gpu_image_swaps_faiss_at_the_pinned_version():
    cpu = re.search(r"^faiss-cpu==(\S+)", (REPO / "requirements.txt").read_text(), re.M).group(1)
    gpu = re.search(r"^faiss-gpu==(\S+)", (REPO / "docker" / "requirements-gpu.txt").read_text(), re.M).group(1)
    assert cpu == gpu
    assert "pip uninstall -y faiss-cpu" in (REPO / "docker" / "Dockerfile.gpu").read_text()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """mcl:cpu and mcl:gpu built from this checkout (the script is a no-op on cached layers;
    one build at a time across the test workers)."""
    from filelock import FileLock

    if os.geteuid() != 0:
        pytest.fail("the image tests need root to run the Docker engine (./run.sh test as root, as in CI)")
    with FileLock(str(tmp_path_factory.getbasetemp().parent / "docker_images.lock")):
        r = subprocess.run(["bash", str(REPO / "scripts" / "docker_local.sh"), "all"], capture_output=True,
                           text=True, timeout=1800)
    assert r.returncode == 0 and r.stdout.split() == ["mcl:cpu", "mcl:gpu"], r.stderr[-3000:]
    return {"cpu": "mcl:cpu", "gpu": "mcl:gpu"}


def _docker_run(*args: str, user: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`docker run` as `user` (default: whoever runs the tests), with a HOME any user can write."""
    user = user or f"{os.getuid()}:{os.getgid()}"
    return subprocess.run(["docker", "run", "--rm", "--user", user, "-e", "HOME=/tmp", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_the_cpu_image_runs_the_quick_demo_into_a_mounted_run_folder(images, tmp_path):
    """As a cluster user would: not root in the container, a run folder of theirs mounted; what
    the demo writes there is theirs (uid 4321 stands for that user; the tests run as root)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    os.chown(runs, 4321, 4321)
    r = _docker_run("-v", f"{runs}:/runs", images["cpu"], "launch", "demo", "--quick", "--out", "/runs/q",
                    user="4321:4321")
    assert r.returncode == 0, r.stderr[-3000:]
    results = runs / "q" / "seed0" / "results.json"
    assert set(json.loads(results.read_text())["models"]) == {"mcl", "stage1", "stage2", "ensemble", "baseline"}
    owners = {p.stat().st_uid for p in (runs / "q").rglob("*")}
    assert owners == {4321}, owners
    assert "| mcl |" in r.stdout and "required (" in r.stdout


def test_eval_mmvp_from_the_cpu_image_gives_the_host_s_numbers(images, tmp_path, tiny_spec):
    """The image's eval.mmvp on a benchmark folder and a model mounted read-only from the host
    writes into a mounted folder the same summary as the host's own run."""
    import torch

    from pipeline import models
    from shards.mmvp_writer import write_benchmark
    bench = write_benchmark(tmp_path / "mmvp", tiny_spec, pairs=4, seed=3)
    torch.manual_seed(0)
    model, *_ = models.create("mcl-tiny-vit")
    models.save_model(model, "mcl-tiny-vit", models.model_config("mcl-tiny-vit"), tmp_path / "m" / "stage1")
    (tmp_path / "out").mkdir()
    r = _docker_run("-v", f"{bench}:/mmvp:ro", "-v", f"{tmp_path / 'm'}:/models:ro", "-v", f"{tmp_path / 'out'}:/out",
                    images["cpu"], "eval.mmvp", "--data", "/mmvp", "--model", "s1=/models/stage1", "--out", "/out")
    assert r.returncode == 0, r.stderr[-3000:]
    host = subprocess.run([sys.executable, "-m", "eval.mmvp", "--data", str(bench), "--model",
                           f"s1={tmp_path / 'm' / 'stage1'}", "--out", str(tmp_path / "host")], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # the CPU, as in the container
    assert host.returncode == 0, host.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "mmvp_summary.json").read_text())
    assert summary == json.loads((tmp_path / "host" / "mmvp_summary.json").read_text())
    assert list(summary["s1"]) == [a.pattern for a in tiny_spec.attributes] + ["average"]


def test_the_gpu_image_imports_its_stack_without_a_gpu(images):
    code = ("import torch, faiss, deepspeed, open_clip, clip_benchmark; "
            "assert hasattr(faiss, 'StandardGpuResources') and faiss.get_num_gpus() == 0; "
            "assert torch.version.cuda and not torch.cuda.is_available(); "
            "import pipeline.train, launch.run, eval.zeroshot; print('OK', torch.__version__, faiss.__version__)")
    r = _docker_run("--entrypoint", "python", images["gpu"], "-c", code, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1].startswith("OK 2.14.1+cu"), r.stdout + r.stderr[-3000:]
    r = _docker_run("--entrypoint", "pip", images["gpu"], "list", "--format=freeze")
    assert "faiss-gpu==" in r.stdout and "faiss-cpu==" not in r.stdout
