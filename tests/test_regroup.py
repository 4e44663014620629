"""The regroup step: a stage's samples written again by group, bytes as they were, resumable
by file, split over array tasks; a vanished regrouped file named in one line."""
from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest


def _samples(path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def test_regrouped_files_hold_the_samples_bytes_by_group_and_a_rerun_writes_only_what_is_missing(
        tmp_path, quick_demo):
    from common.cli import UsageError
    from pipeline.loader.groups import coarse_groups
    from pipeline.loader.regrouped import RegroupedStream
    from pipeline.regroup import RegroupSpec, is_done, regroup
    from shards.reader import expand_urls

    demo = quick_demo[0] / "seed0" / "mcl"
    data = json.loads((demo / "run_config.json").read_text())["data"]
    stage = tmp_path / "stage1"
    shutil.copytree(demo / "stage1", stage, ignore=shutil.ignore_patterns("checkpoints", "superseded"))
    out = tmp_path / "regrouped"
    specs = [RegroupSpec(stage=str(stage), data=data, world_size=2, batch_size=16, out=str(out), chunk_steps=2,
                         file_samples=64, task=t, tasks=2) for t in range(2)]
    meta = regroup(specs[0])
    assert not is_done(specs[0])  # task 1's bundles are missing
    regroup(specs[1])
    assert is_done(specs[0]) and is_done(specs[1])
    files = sorted(out.glob("b*.tar"))
    assert [p.name for p in files] == sorted(name for row in meta["files"] for name in row)

    source = {}
    for url in expand_urls(data):
        source.update(_samples(url))
    group_of = {}
    from pipeline.loader.stage_index import read
    from pipeline.stage import StageDir
    index = read(StageDir(stage), expand_urls(data))
    group, _, _ = coarse_groups(np.asarray(index.label), index.ks, 32)
    from pipeline.loader.labels import stable_hash64
    by_hash = dict(zip(np.asarray(index.key_hash).tolist(), group.tolist()))
    seen = []
    for path in files:
        for key, members in _samples(path).items():
            cls = members.pop("cls", None)  # in mixed chunks only
            assert members == source[key]  # every member's bytes as in the source shard
            assert cls is None or int(cls) == by_hash[stable_hash64(key)]
            seen.append(key)
            group_of[key] = by_hash[stable_hash64(key)]
    assert sorted(seen) == sorted(source)  # every sample once (the quick world has no faults)
    # each file's chunks: the parts listed in the record, pure chunks of one group
    for b, chunks in enumerate(meta["bundles"]):
        for r in range(2):
            keys = list(_samples(out / meta["files"][b][r]))
            at = 0
            for chunk in chunks:
                part = keys[at:at + chunk["parts"][r]]
                at += len(part)
                if chunk["group"] >= 0:
                    assert {group_of[k] for k in part} == {chunk["group"]}
                    assert all("cls" not in members for k, members in _samples(out / meta["files"][b][r]).items()
                               if k in part)
                else:
                    assert all("cls" in members for k, members in _samples(out / meta["files"][b][r]).items()
                               if k in part)
            assert at == len(keys)

    # a file lost: the rerun writes it alone, the same bytes
    stamps = {p: p.stat().st_mtime_ns for p in files}
    lost = files[3]
    before = lost.read_bytes()
    lost.unlink()
    with pytest.raises(UsageError, match=rf"{lost.name}: missing \(1 of this rank's regrouped files\); run the "
                                         r"regroup step again"):
        RegroupedStream(str(out), None, None, 16, rank=int(lost.name.split("-r")[1][:4]), world_size=2)
    assert not is_done(specs[0])
    for spec in specs:
        regroup(spec)
    assert lost.read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in files if p != lost} == {p: t for p, t in stamps.items() if p != lost}
    # another layout (W x B) has other names: nothing of this one is taken for it
    other = RegroupSpec(stage=str(stage), data=data, world_size=1, batch_size=32, out=str(out))
    assert not is_done(other)
    with pytest.raises(UsageError, match="regrouped for 2 ranks x 16, not this training's 1 x 32"):
        RegroupedStream(str(out), None, None, 32, rank=0, world_size=1)


def test_a_rank_whose_loader_fails_in_a_worker_exits_with_the_error(tmp_path, quick_demo):
    """DataLoader workers ignore SIGTERM (a stop signal is the trainer's): a rank that ends on
    an error while its workers still read must not wait for them at exit."""
    import subprocess
    import sys

    from conftest import REPO
    from pipeline.regroup import RegroupSpec, regroup

    demo = quick_demo[0] / "seed0" / "mcl"
    data = json.loads((demo / "run_config.json").read_text())["data"]
    regroup(RegroupSpec(stage=str(demo / "stage1"), data=data, world_size=1, batch_size=32, out=str(tmp_path / "rg")))
    code = ("import pipeline.loader.regrouped as R\n"
            "def fail(self, raws, group):\n    raise TypeError('a worker failed')\n"
            "R.RegroupedStream._checked = fail\n"
            "from pipeline import train\n"
            f"raise SystemExit(train.main(['data={data}', 'out={tmp_path / 'out'}', 'labels=sidecars:{demo / 'stage1'}', "
            f"'bucket=stream', 'regrouped={tmp_path / 'rg'}', 'steps=3', 'batch_size=32', 'workers=2', 'threads=1', "
            "'model=mcl-tiny-vit']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "a worker failed" in r.stderr, r.stderr[-2000:]
