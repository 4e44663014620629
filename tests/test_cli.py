"""The commands as a user runs them: validate, from_files, and their errors."""
from __future__ import annotations

import json
import re
import shutil
import tarfile

import pyarrow.parquet as pq
import pytest

from conftest import run_cli, write_raw_tar
from shards.generate import generate
from shards.reader import read_samples


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_spec):
    out = tmp_path_factory.mktemp("world")
    generate(out, tiny_spec, 60, 20, seed=0, progress=False)
    return out


def _members(tar_path):
    with tarfile.open(tar_path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def test_validate_clean_shards_writes_sizes(tmp_path, world):
    for p in world.iterdir():
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "sizes.json").unlink()
    r = run_cli("shards.validate", f"{tmp_path}/{{00000..00002}}.tar", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 20, "00001.tar": 20, "00002.tar": 20}
    assert re.search(r"^total\s+60\s+0$", r.stdout, re.M)


def test_validate_reports_problems_and_fails_over_the_threshold(tmp_path, world):
    good = _members(world / "00000.tar")
    keys = sorted({n.split(".")[0] for n in good})
    # drop two downloaded samples from the tar (the parquet still lists them), break a caption
    members = [(n, b) for n, b in sorted(good.items()) if n.split(".")[0] not in keys[:2]]
    members = [(n, b"\xff\xfe" if n == f"{keys[5]}.txt" else b) for n, b in members]
    write_raw_tar(tmp_path / "00000.tar", members)
    shutil.copy(world / "00000.parquet", tmp_path / "00000.parquet")
    (tmp_path / "00001.tar").write_bytes(b"")
    report = tmp_path / "report.json"
    r = run_cli("shards.validate", str(tmp_path), "--report", str(report), "--sizes", str(tmp_path / "s.json"))
    assert r.returncode == 1
    assert "FAILED: problem rate" in r.stdout
    rep = json.loads(report.read_text())
    assert rep["samples"] == 17
    assert rep["problem_counts"] == {"missing_sample": 2, "bad_text_encoding": 1, "empty_tar": 1}
    assert {p["key"] for p in rep["problems"] if p["kind"] == "missing_sample"} == set(keys[:2])
    assert f"bad_text_encoding: {tmp_path}/00000.tar key {keys[5]}" in r.stdout
    assert json.loads((tmp_path / "s.json").read_text()) == {"00000.tar": 17, "00001.tar": 0}
    # the same shards pass under a looser threshold
    r = run_cli("shards.validate", str(tmp_path), "--max-problem-rate", "0.5", "--sizes", "none")
    assert r.returncode == 0, r.stdout


def _explode_to_files(world, dest):
    """What img2dataset --output_format files writes: 00000/{key}.jpg|txt|json + parquet, stats."""
    for tar in sorted(world.glob("*.tar")):
        folder = dest / tar.stem
        folder.mkdir(parents=True)
        for name, data in _members(tar).items():
            (folder / name).write_bytes(data)
        shutil.copy(world / f"{tar.stem}.parquet", dest / f"{tar.stem}.parquet")
        shutil.copy(world / f"{tar.stem}_stats.json", dest / f"{tar.stem}_stats.json")


def test_from_files_round_trip_keeps_keys_and_bytes(tmp_path, world):
    files = tmp_path / "files"
    _explode_to_files(world, files)
    out = tmp_path / "shards"
    r = run_cli("shards.from_files", str(files), str(out), "--workers", "2")
    assert r.returncode == 0, r.stderr
    for tar in sorted(world.glob("*.tar")):
        assert _members(out / tar.name) == _members(tar)
        assert (out / f"{tar.stem}.parquet").read_bytes() == (world / f"{tar.stem}.parquet").read_bytes()
    assert json.loads((out / "sizes.json").read_text()) == json.loads((world / "sizes.json").read_text())
    a = [(s["__key__"], s["text"]) for s in read_samples(str(out), decode=False)]
    b = [(s["__key__"], s["text"]) for s in read_samples(str(world), decode=False)]
    assert a == b and len(a) == 60
    # a rerun skips finished shards
    mtime = (out / "00000.tar").stat().st_mtime_ns
    r = run_cli("shards.from_files", str(files), str(out))
    assert r.returncode == 0 and "3 of 3 shards already converted" in r.stderr
    assert (out / "00000.tar").stat().st_mtime_ns == mtime


def test_from_files_flat_folder_without_metadata(tmp_path, world):
    flat = tmp_path / "flat"
    flat.mkdir()
    for name, data in _members(world / "00001.tar").items():
        if not name.endswith(".json"):
            (flat / name).write_bytes(data)
    (flat / "orphan.txt").write_text("a caption without its image")
    r = run_cli("shards.from_files", str(flat), str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "1 keys lack an image or a caption" in r.stderr
    rows = pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()
    assert len(rows) == 21 and rows[0]["caption"].startswith("a photo of")
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"00000.tar": 20}


@pytest.mark.parametrize("args, message", [
    (["shards.validate", "/nonexistent/{0..1}.tar"], "/nonexistent/0.tar: no such shard"),
    (["shards.validate", "a.tar", "--max-problem-rate", "x"], "invalid float value"),
    (["shards.validate", "::"], "names no shards"),
    (["shards.from_files", "/nonexistent", "/tmp/x"], "/nonexistent: no such folder"),
    (["shards.generate", "/tmp/x", "--world", "/nonexistent.yaml"], "/nonexistent.yaml: cannot read world spec"),
    (["shards.generate", "/tmp/x", "--num-samples", "0"], "--num-samples and --samples-per-shard must be >= 1"),
    (["shards.mmvp_writer", "/tmp/x", "--pairs", "0"], "--pairs must be >= 1"),
    (["launch", "demo", "--config", "/nonexistent.yaml"], "/nonexistent.yaml: cannot read config"),
    (["launch", "frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    r = run_cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("module", ["shards.validate", "shards.from_files", "shards.generate",
                                    "shards.mmvp_writer", "launch"])
def test_help(module):
    r = run_cli(module, "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m ")
    assert len(r.stdout.splitlines()) > 8  # the module's description is part of it
