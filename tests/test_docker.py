"""The docker images: linted (no Docker engine runs here) and consistent with the repo."""
from __future__ import annotations

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
