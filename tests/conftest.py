"""Shared test helpers: the repo root, a CLI runner, the tiny world, raw tar writing."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import socket
import tarfile
import time
from pathlib import Path

import psutil
import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shards import world as W  # noqa: E402


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m ARGS...` with this interpreter; capture text output (`env`: added to ours)."""
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env} if env else None)


def check_a_rerun_waits_for_the_job_of_a_killed_launcher(args: list[str], run_dir: Path, executor: str,
                                                       steps: int, timeout: float = 300) -> str:
    """Start `launch run ARGS` (stage 1 of `steps` steps logged every step); once its training job
    runs, pause the job (so that it cannot end first), check that a second launcher is refused,
    SIGKILL the first launcher alone, start the same command again and let the job go on once the
    rerun has said its first line. Checks that the rerun waited for that job, which trained once,
    and returns the rerun's output."""
    from launch.jobs import live_jobs

    cmd = [sys.executable, "-m", "launch", "run", *args]
    launcher = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.time() + timeout
    while not (run_dir / "stage1" / "metrics.jsonl").is_file():
        assert launcher.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.05)
    matches = [p for p in psutil.process_iter(["name", "cmdline", "ppid"])  # not srun
               if (p.info["name"] or "").startswith("python")
               and "submitit.core._submit" in " ".join(p.info["cmdline"] or [])
               and str(run_dir) in " ".join(p.info["cmdline"] or [])]
    # a DataLoader worker keeps its parent's name and command line until it renames itself
    jobs = [p for p in matches if p.info["ppid"] not in {m.pid for m in matches}]
    assert len(jobs) == 1, matches
    paused = [jobs[0], *jobs[0].children(recursive=True)]
    for p in paused:
        with contextlib.suppress(psutil.NoSuchProcess):  # a DataLoader worker may have just ended
            p.suspend()
    try:
        refused = run_cli(*cmd[2:])
        launcher.kill()
        launcher.wait()
        job_ids = json.loads((run_dir / "launch_state.json").read_text())["stage1/train"]["job_ids"]
        rerun = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = rerun.stdout.readline()
    finally:
        for p in paused:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.resume()
    out, err = rerun.communicate(timeout=600)
    out = first + out
    assert refused.returncode != 0 and "another launcher is running this run" in refused.stderr, refused.stderr
    assert rerun.returncode == 0, err[-3000:]
    assert f"stage1/train         waiting for job(s) {job_ids[0]} of an earlier launch" in out, out
    state = json.loads((run_dir / "launch_state.json").read_text())
    assert state["stage1/train"]["state"] == "done" and state["stage1/train"]["job_ids"] == job_ids
    logged = [json.loads(line)["step"] for line in (run_dir / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))  # trained once, not restarted from a checkpoint
    assert live_jobs(executor, job_ids, run_dir) == []
    return out


def write_raw_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with exactly these members, in this order (for malformed shards)."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="session")
def tiny_spec() -> W.WorldSpec:
    return W.load_spec(str(REPO / "configs" / "worlds" / "tiny.yaml"))


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, tiny_spec) -> Path:
    """600 samples of the tiny world in 3 shards, with sizes.json."""
    from shards.generate import generate
    out = tmp_path_factory.mktemp("tiny_shards")
    generate(out, tiny_spec, 600, 200, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory, worker_id) -> tuple[Path, subprocess.CompletedProcess]:
    """`python -m launch demo --quick` once for the session: its folder and the completed command.
    Its seed0/mcl is also the tests' reference MCL run (2 stages through the local executor).
    Under pytest-xdist the first worker that needs it runs it, under a file lock, in the folder
    the workers share; the others wait and read its record."""
    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent
    out, record = root / "quick_demo", root / "quick_demo.json"
    with FileLock(f"{record}.lock"):
        if not record.is_file():
            r = run_cli("launch", "demo", "--quick", "--out", str(out), "--workers", "2")
            record.write_text(json.dumps({"args": r.args, "returncode": r.returncode, "stdout": r.stdout,
                                          "stderr": r.stderr}))
    r = subprocess.CompletedProcess(**json.loads(record.read_text()))
    assert r.returncode == 0, r.stderr[-4000:]
    return out, r


def rerun_quick_demo(out: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m launch ARGS` on the quick demo's folder `out`, one such rerun at a time across
    the xdist workers (a second launcher of a run folder is refused while the first runs)."""
    with FileLock(f"{out}.rerun.lock"):
        return run_cli(*args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server(monkeypatch):
    """moto's S3-compatible server on localhost; the AWS variables point s3fs (fsspec) at it."""
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.2)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # fsspec keeps file systems by arguments, not by endpoint
    yield env
    s3fs.S3FileSystem.clear_instance_cache()
    server.terminate()
    server.wait(timeout=10)
