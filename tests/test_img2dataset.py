"""Real img2dataset output, with the faults real CC12M shards contain, through a whole 2-stage run.

The fixture runs the real `img2dataset` (its own venv, .venv-img2dataset: ./run.sh test makes it)
on file:// URLs of synthetic-world images, three of them missing (failed downloads), then
injects into its shards a truncated JPEG, a sample without caption, a non-UTF-8 caption, and
cuts the last shard short. The folder has img2dataset's _stats.json files and no sizes.json.
"""
from __future__ import annotations

import csv
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import REPO, run_cli, write_raw_tar

IMG2DATASET = REPO / ".venv-img2dataset" / "bin" / "img2dataset"
INJECTED = {"corrupt_image": 1, "missing_caption": 1, "bad_text_encoding": 1, "truncated_tar": 1}


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]


@pytest.fixture(scope="module")
def img2dataset_shards(tmp_path_factory, tiny_spec) -> dict:
    """{"data": folder of img2dataset shards with faults, "skipped": {key: kind} of the faulty samples of
    shard 00001, "good": the samples left}."""
    from shards.generate import generate
    from shards.reader import read_samples

    assert IMG2DATASET.is_file(), f"{IMG2DATASET} missing: ./run.sh test installs it (requirements-img2dataset.txt)"
    root = tmp_path_factory.mktemp("img2dataset")
    generate(root / "src", tiny_spec, 300, 300, seed=3, progress=False)
    (root / "images").mkdir()
    rows = []
    for i, s in enumerate(read_samples(str(root / "src"), decode=False)):
        image = root / "images" / f"{i}.jpg"
        image.write_bytes(s["image"])
        rows.append({"url": image.as_uri(), "caption": s["text"]})
        if i % 100 == 50:  # a failed download now and then
            rows.append({"url": (root / "images" / f"gone{i}.jpg").as_uri(), "caption": "a lost image"})
    with open(root / "urls.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["url", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    out = root / "shards"
    r = subprocess.run([str(IMG2DATASET), "--url_list", str(root / "urls.csv"), "--input_format", "csv",
                        "--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset",
                        "--output_folder", str(out), "--processes_count", "1", "--thread_count", "4",
                        "--image_size", "32", "--resize_mode", "no", "--number_sample_per_shard", "101",
                        "--enable_wandb", "False", "--distributor", "multiprocessing"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = {p.name: json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))}
    assert len(stats) == 3 and sum(s["successes"] for s in stats.values()) == 300
    assert sum(s["failed_to_download"] for s in stats.values()) == 3
    assert not (out / "sizes.json").exists()

    # shard 00001: a truncated JPEG, a caption lost, a caption that is not UTF-8
    members = _members(out / "00001.tar")
    keys = sorted({name.split(".")[0] for name, _ in members})
    corrupt, uncaptioned, badtext = keys[10], keys[20], keys[30]
    broken = []
    for name, data in members:
        if name == f"{corrupt}.jpg":
            data = data[: len(data) // 2]
        elif name == f"{uncaptioned}.txt":
            continue
        elif name == f"{badtext}.txt":
            data = b"\xff\xfe a caption in another encoding \xe9"
        broken.append((name, data))
    write_raw_tar(out / "00001.tar", broken)
    # the last shard cut short in the middle of an image (the samples before it are whole)
    with tarfile.open(out / "00002.tar") as tf:
        cut = next(m for m in tf.getmembers()[len(tf.getmembers()) // 2:] if m.name.endswith(".jpg"))
    last = (out / "00002.tar").read_bytes()
    (out / "00002.tar").write_bytes(last[: cut.offset_data + cut.size // 2])

    from shards.reader import ProblemLog
    problems = ProblemLog(logger=None)
    good = sum(1 for _ in read_samples(str(out), problems))
    assert dict(problems.counts) == INJECTED  # the reader names exactly what was injected
    assert 200 < good < 300 - 3
    skipped = {corrupt: "corrupt_image", uncaptioned: "missing_caption", badtext: "bad_text_encoding"}
    return {"data": out, "skipped": skipped, "good": good}


def test_a_whole_two_stage_run_goes_through_real_img2dataset_output_with_faults(tmp_path, img2dataset_shards):
    data, run_dir = img2dataset_shards["data"], tmp_path / "run"
    args = ["--config", str(REPO / "configs" / "tiny_mcl.yaml"), f"run_dir={run_dir}", f"data={data}", "mmvp=",
            "clusters=2", "train.steps=", "train.epochs=1", "executor.tasks=1"]
    r = run_cli("launch", "run", *args)
    assert r.returncode == 0, r.stderr[-4000:]
    good = img2dataset_shards["good"]
    for stage in ("stage1", "stage2"):
        done = json.loads((run_dir / stage / "done.json").read_text())
        assert done["data_problems"] == INJECTED, (stage, done["data_problems"])
    # the samples embed could not use (the one whose image does not decode among them): recorded
    # with their problem, carried into the sidecar, skipped and counted by stage 2's loader
    import numpy as np
    from pipeline.artifacts import read_skipped, sidecar_skipped
    from pipeline.stage import StageDir
    stage1 = StageDir(run_dir / "stage1")
    skipped = img2dataset_shards["skipped"]
    assert read_skipped(stage1.embeddings("00001.tar")) == skipped
    assert sidecar_skipped(stage1.sidecar("00001.tar")) == skipped
    embedded = sum(len(np.load(p)["keys"]) for p in stage1.embedding_files())
    assert embedded == good
    # stage 2's epoch (the global-batch loader, its steps counted from the sidecars: exactly
    # one epoch): every good sample exactly once, nothing else
    epochs = [json.loads(line) for line in stage1.path.parent.joinpath("stage2", "loader_stats.jsonl")
              .read_text().splitlines()]
    assert epochs[0]["complete"] and epochs[0]["samples"] == good and epochs[0]["missing_labels"] == 0

    # a shard that disappears after stage 1 and 2: the next launch stops at once, naming it
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    gone = data.parent / "00001.tar.moved"
    (data / "00001.tar").rename(gone)
    try:
        r = run_cli("launch", "run", *args, "stages=3")
    finally:
        gone.rename(data / "00001.tar")
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "00001" in lines[0] and "no longer in" in lines[0], lines
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == stamps


def test_the_skip_record_holds_dropped_samples_with_their_first_problem():
    from pipeline.embed import skipped_keys
    from shards.reader import ProblemLog

    problems = ProblemLog(logger=None)
    problems.add("corrupt_image", "a.tar", "k1")
    problems.add("duplicate_key", "a.tar", "k1")   # a second k1 after the corrupt first one
    problems.add("bad_json", "a.tar", "k2")        # kept, with json None: it has a row
    problems.add("missing_caption", "b.tar", "k3")  # another shard
    problems.add("truncated_tar", "a.tar")          # no key
    assert skipped_keys(problems, "a.tar") == {"k1": "corrupt_image", "__shard__:truncated_tar": "truncated_tar"}


def test_a_run_on_object_storage_streams_stage_2_from_regrouped_shards_with_every_fault_counted(
        tmp_path, img2dataset_shards, s3_server):
    """The img2dataset output (with its faults) on an S3-compatible server and nothing of it on
    local disk: the launcher counts it from the stats at its URL, stage 2 streams (the default
    for remote data) from the regrouped shards the regroup step wrote to the same server, and
    every injected fault is still counted in both stages."""
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.mkdir("mcl-cc")
    data = img2dataset_shards["data"]
    for p in sorted(data.iterdir()):
        fs.put_file(str(p), f"mcl-cc/shards/{p.name}")
    run_dir = tmp_path / "run"
    r = run_cli("launch", "run", "--config", str(REPO / "configs" / "tiny_mcl.yaml"), f"run_dir={run_dir}",
                "data=s3://mcl-cc/shards/{00000..00002}.tar", "mmvp=", "clusters=2", "train.steps=", "train.epochs=1",
                "executor.tasks=1", "regrouped_root=s3://mcl-cc/regrouped")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "stage1/regroup" in r.stdout
    for stage in ("stage1", "stage2"):
        done = json.loads((run_dir / stage / "done.json").read_text())
        assert done["data_problems"] == INJECTED, (stage, done["data_problems"])
    assert json.loads((run_dir / "stage2" / "done.json").read_text())["batching"] == "stream"
    epochs = [json.loads(line) for line in (run_dir / "stage2" / "loader_stats.jsonl").read_text().splitlines()]
    assert epochs[0]["complete"] and epochs[0]["samples"] == img2dataset_shards["good"]
    layout = json.loads(fs.cat_file("mcl-cc/regrouped/stage1/layout.json"))
    stored = {p.rsplit("/", 1)[-1] for p in fs.ls("mcl-cc/regrouped/stage1", detail=False)}
    assert {name for row in layout["files"] for name in row} <= stored and layout["samples"] == \
        img2dataset_shards["good"]
    assert epochs[0]["fallback_samples"] == layout["fallback_samples"]  # counted as the samples are read
    assert not (run_dir / "stage1" / "regrouped").exists()
    # two ranks stream the same labels from the server, regrouped for 2 x 32: every anchor of a
    # pure step meets all 63 others of its group
    import os
    import sys

    from pipeline.regroup import RegroupSpec, regroup
    regroup(RegroupSpec(stage=str(run_dir / "stage1"), data="s3://mcl-cc/shards/{00000..00002}.tar", world_size=2,
                        batch_size=32, out="s3://mcl-cc/regrouped/two-ranks"))
    out = tmp_path / "two_ranks"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "pipeline.train", "data=s3://mcl-cc/shards/{00000..00002}.tar", f"out={out}",
                        f"labels=sidecars:{run_dir / 'stage1'}", "bucket=stream",
                        "regrouped=s3://mcl-cc/regrouped/two-ranks", "model=mcl-tiny-vit", "batch_size=32",
                        "steps=4", "log_every=1", "workers=1", "threads=1", "warmup=1", "max_fallback=0.5"],
                       cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    layout = json.loads(fs.cat_file("mcl-cc/regrouped/two-ranks/layout.json"))
    epochs = [json.loads(line) for line in (out / "loader_stats.jsonl").read_text().splitlines()]
    pure_steps = sum(e["pure_batches"] for e in epochs) // 2  # counted per rank's batch
    assert layout["stats"]["pure_steps"] > 0 and len(records) == 4 and pure_steps > 0
    assert sum(rec["effective_negatives"] == 63 for rec in records) == pure_steps, (records, epochs)
