"""Shards behind a URL: a real HTTP server and an S3-compatible server (moto's) on localhost.

Sample counts come from the sizes.json (or img2dataset's stats) at the shards' URL; a plan
that could never read the data where it lies is refused before anything is submitted."""
from __future__ import annotations

import functools
import http.server
import json
import re
import os
import shutil
import subprocess
import sys
import threading

import pytest

from conftest import REPO, run_cli


@pytest.fixture
def http_root(tmp_path):
    """A folder served over HTTP on localhost: (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_sample_counts_come_from_the_shards_url_over_http(http_root, tiny_shards):
    from common.cli import UsageError
    from shards.reader import shard_sizes

    root, base = http_root
    local = sorted(tiny_shards.glob("*.tar"))
    want = shard_sizes([str(p) for p in local])
    (root / "a").mkdir()
    for p in local + [tiny_shards / "sizes.json"]:
        shutil.copy(p, root / "a" / p.name)
    urls = [f"{base}/a/{p.name}" for p in local]
    assert shard_sizes(urls) == want  # sizes.json at the URL

    (root / "b").mkdir()  # img2dataset's output: a stats file per shard, no sizes.json
    for p, n in zip(local, want):
        shutil.copy(p, root / "b" / p.name)
        (root / "b" / f"{p.stem}_stats.json").write_text(json.dumps({"successes": n, "count": n + 3}))
    assert shard_sizes([f"{base}/b/{p.name}" for p in local]) == want

    (root / "b" / f"{local[1].stem}_stats.json").unlink()
    with pytest.raises(UsageError, match=rf"{base}/b/{local[1].name}: neither {base}/b/sizes.json nor "
                                         rf"{base}/b/{local[1].stem}_stats.json exists; .* train_num_samples"):
        shard_sizes([f"{base}/b/{p.name}" for p in local])
    with pytest.raises(UsageError, match="pipe: shard is unknown; set train_num_samples"):
        shard_sizes([f"pipe:curl -s {base}/a/{local[0].name}"])


def test_a_plan_that_cannot_read_remote_data_is_refused_before_anything_runs(http_root, tiny_shards, tmp_path):
    root, base = http_root
    for p in [*tiny_shards.glob("*.tar"), tiny_shards / "sizes.json"]:
        shutil.copy(p, root / p.name)
    data = f"{base}/{{00000..00002}}.tar"
    args = ["launch", "run", "--config", str(REPO / "configs" / "tiny_mcl.yaml"), f"run_dir={tmp_path / 'r'}",
            f"data={data}", "mmvp="]
    refused = run_cli(*args, "later.bucket=global", "--dry-run")
    assert refused.returncode == 2, refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert line.endswith(f"stage 2: bucket=global reads samples by random access and needs local or mounted "
                         f"shards, not {base}/00000.tar; mount the data or use bucket=stream (train.bucket in a run "
                         f"config: the regroup step's shards, read whole)"), line
    assert not (tmp_path / "r").exists()
    # by default remote data streams: a regroup step after the reduce; the forecast counts 600
    # samples from sizes.json at the URL
    planned = run_cli(*args, "--dry-run")
    assert planned.returncode == 0, planned.stderr[-3000:]
    steps = [line.split()[0] for line in planned.stdout.splitlines() if not line.startswith("forecast")]
    assert steps[steps.index("stage1/reduce") + 1:][:2] == ["stage1/regroup", "stage2/train"], planned.stdout
    assert "N=600" not in planned.stdout and "forecast" in planned.stdout
    packed = run_cli(*args[:-2], f"data={base}/{{00000..00002}}.tar.gz", "mmvp=", "--dry-run")
    assert packed.returncode == 2 and packed.stderr.strip().splitlines()[-1].endswith(
        f"stage 2: bucket=stream (its regroup step) reads samples by their byte offsets and needs uncompressed .tar "
        f"shards, not {base}/00000.tar.gz; use bucket=slot for compressed shards"), packed.stderr
    # skipping the regroup (bucket=slot) is said with its cost, before anything runs
    slot = run_cli(*args, "later.bucket=slot", "executor.name=slurm", "executor.slurm.gpus_per_node=4", "--dry-run")
    assert slot.returncode == 0, slot.stderr[-2000:]
    assert re.search(r"bucket=slot: each rank's batch is one group, the gathered batch W of them, so an anchor keeps "
                     r"about \d+ of its 127 negatives", slot.stdout), slot.stdout
    assert "stage1/regroup" not in slot.stdout
    # a place the regroup cannot write is one line before anything runs
    blocked = tmp_path / "file"
    blocked.write_text("")
    refused = run_cli(*args, f"regrouped_root={blocked}/x", "--dry-run")
    assert refused.returncode == 2 and f"tiny_mcl.yaml: regrouped_root: cannot write to {blocked}/x (" in \
        refused.stderr.strip().splitlines()[-1], refused.stderr


def test_shards_on_an_s3_compatible_server_are_counted_and_read(s3_server, tiny_shards):
    import fsspec

    from shards.reader import ProblemLog, read_samples, shard_sizes

    fs = fsspec.filesystem("s3")
    fs.mkdir("mcl-data")
    local = sorted(tiny_shards.glob("*.tar"))
    for p in local + [tiny_shards / "sizes.json"]:
        fs.put_file(str(p), f"mcl-data/cc/{p.name}")
    urls = [f"s3://mcl-data/cc/{p.name}" for p in local]
    assert shard_sizes(urls) == shard_sizes([str(p) for p in local]) == [200, 200, 200]
    problems = ProblemLog()
    keys = [s["__key__"] for s in read_samples(urls, problems, decode=True)]
    assert len(keys) == len(set(keys)) == 600 and not problems.items
    # in a process of its own, as a training or embed job would read it
    code = ("import sys; from shards.reader import read_samples; "
            "print(sum(1 for _ in read_samples(sys.argv[1:], decode=False)))")
    r = subprocess.run([sys.executable, "-c", code, *urls], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, **s3_server}, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["600"], r.stderr[-2000:]
