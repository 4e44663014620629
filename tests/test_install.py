"""Installed, not borrowed from the clone: `pip install --no-deps` of a copy of the clone into a
fresh virtual environment, the copy deleted, then from another folder the `mcl` console command
shows every command's help and runs a small whole run (configs/ come with the install)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import REPO


def test_the_installed_console_command_runs_every_job_and_a_run_from_another_folder(tmp_path, tiny_shards):
    from launch.cli import JOBS, TOOLS, WHOLE_RUNS

    copy, venv, elsewhere = tmp_path / "src", tmp_path / "venv", tmp_path / "elsewhere"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".venv*", ".git", "runs", "__pycache__", "*.egg-info",
                                                              "build"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    (site / "_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co., not the project
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                        "--no-deps", "--no-build-isolation", str(copy)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.rmtree(copy)
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    mcl = str(venv / "bin" / "mcl")

    def run(*args, timeout=120):
        return subprocess.run([mcl, *args], cwd=elsewhere, capture_output=True, text=True, timeout=timeout, env=env)

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import pipeline, launch; print(pipeline.__file__)"],
                           cwd=elsewhere, capture_output=True, text=True, env=env)
    assert where.stdout.startswith(str(site)), where
    for command in (*WHOLE_RUNS, *JOBS, *TOOLS):
        r = run(command, "--help")
        assert r.returncode == 0 and "usage:" in r.stdout, (command, r.stderr[-2000:])
    assert "--stages" in run("merge", "--help").stdout and "--sample-size" in run("cluster", "--help").stdout
    r = run("nosuchcommand")
    assert r.returncode == 2 and "unknown command 'nosuchcommand'" in r.stderr
    r = run("run", "--config", "configs/tiny_mcl.yaml", "run_dir=run", f"data={tiny_shards}", "mmvp=", "stages=1",
            "train.steps=2", "train.log_every=1", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (elsewhere / "run" / "stage1" / "done.json").is_file() and (elsewhere / "run" / "merged.pt").is_file()
    r = run("status", "run")
    assert r.returncode == 0 and [line.split()[:2] for line in r.stdout.splitlines()] == [
        ["stage1/train", "done"], ["merge", "done"]]
