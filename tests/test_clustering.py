"""Embedding, Faiss clustering and sidecars: planted clusters, keys, stage labels, kill, staleness."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO, run_cli, write_raw_tar
from pipeline import models
from pipeline.artifacts import (StaleSidecarError, read_embeddings, read_sidecar, read_sidecar_columns,
                                write_embeddings)
from pipeline import assign as assign_job, cluster as cluster_job, reduce as reduce_job
from pipeline.assign import AssignSpec
from pipeline.cluster import ClusterSpec
from pipeline.embed import EmbedSpec, embed
from pipeline.reduce import ReduceSpec
from pipeline.stage import StageDir, current_record
from shards.reader import ProblemLog, read_samples


def cluster(stage, **params):
    return cluster_job.cluster(ClusterSpec(stage=str(stage), **params))


def assign(stage, index, parent=None):
    return assign_job.assign(AssignSpec(stage=str(stage), stage_index=index, parent=str(parent) if parent else None))


def reduce(stage):
    return reduce_job.reduce(ReduceSpec(stage=str(stage)))


def _planted(stage_dir, n_shards=3, per_shard=300, k=5, d=32, seed=0, model_fp="m", noise=0.05):
    """Embeddings around k random unit centres; returns {key: planted cluster}."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = {}
    for s in range(n_shards):
        keys = [f"{s:05d}{i:04d}" for i in range(per_shard)]
        c = rng.integers(k, size=per_shard)
        x = centres[c] + noise * rng.normal(size=(per_shard, d))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        attrs = [f'{{"planted": {int(v)}}}' for v in c]
        write_embeddings(stage_dir / "embeddings" / f"{s:05d}.npz", x, keys, ["a caption"] * per_shard, attrs,
                         model_fp)
        truth.update(zip(keys, c.tolist()))
    return truth


def _sidecar_clusters(stage_dir):
    out = {}
    for path in sorted((stage_dir / "sidecars").glob("*.parquet")):
        keys, clusters, labels = read_sidecar_columns(path)
        out.update({k: (int(c), int(lab)) for k, c, lab in zip(keys, clusters, labels)})
    return out


def test_kmeans_recovers_planted_clusters(tmp_path):
    from sklearn.metrics import adjusted_rand_score
    truth = _planted(tmp_path, k=6)
    stats = cluster(tmp_path, k=6, sample_size=600, seed=1)
    assert stats["samples_trained"] == 600 and stats["samples_total"] == 900
    assert stats["faiss_max_points_per_centroid"] * 6 >= 600  # faiss used every sampled point
    assert stats["nmi_sample"]["planted"] > 0.99 and stats["empty_clusters"] == 0
    assign(tmp_path, 1)
    got = _sidecar_clusters(tmp_path)
    keys = sorted(truth)
    assert adjusted_rand_score([truth[k] for k in keys], [got[k][0] for k in keys]) > 0.99
    red = reduce(tmp_path)
    assert red["nmi"]["planted"] > 0.99 and red["purity"]["planted"] > 0.99 and sum(red["cluster_sizes"]) == 900
    assert red["groups"]["groups"] == 6 and red["groups"]["samples"] == 900
    # centroids are reused on rerun with the same parameters, retrained with others
    assert cluster(tmp_path, k=6, sample_size=600, seed=1)["time_train_s"] == stats["time_train_s"]


def test_stage_labels_pack_every_previous_stage(tmp_path):
    stages = [tmp_path / f"stage{s}" for s in (1, 2, 3)]
    ks = (3, 4, 2)
    for s, (d, k) in enumerate(zip(stages, ks)):
        _planted(d, k=k, seed=10 + s, model_fp=f"model{s + 1}")  # independent structure per stage
        cluster(d, k=k, seed=s)
    assign(stages[0], 1)
    assign(stages[1], 2, parent=stages[0])
    assign(stages[2], 3, parent=stages[1])
    c1, c2, c3 = (_sidecar_clusters(d) for d in stages)
    assert set(c1) == set(c2) == set(c3)
    assert any(c1[k][0] != c2[k][0] for k in c1)  # the stages really cluster differently
    for key in c3:
        assert c1[key][1] == c1[key][0]
        assert c2[key][1] == c1[key][0] * ks[1] + c2[key][0]
        assert c3[key][1] == (c1[key][0] * ks[1] + c2[key][0]) * ks[2] + c3[key][0]
    meta = pq.read_schema(stages[2] / "sidecars" / "00000.parquet").metadata
    assert b'"ks": [3, 4, 2]' in meta[b"mcl.sidecar"]
    groups = reduce(stages[2])["groups"]
    assert groups["groups"] == len({v[1] for v in c3.values()}) <= 24


def test_stale_and_foreign_sidecars_are_refused(tmp_path):
    s1, s2 = tmp_path / "stage1", tmp_path / "stage2"
    _planted(s1, k=4, seed=1, model_fp="model1")
    _planted(s2, k=4, seed=2, model_fp="model2")
    cluster(s1, k=4)
    cluster(s2, k=4)
    assign(s1, 1)
    assign(s2, 2, parent=s1)
    expect = current_record(StageDir(s2)).meta
    assert expect.ks == (4, 4) and current_record(StageDir(s2)).parent == s1
    assert len(read_sidecar(s2 / "sidecars" / "00000.parquet", expect)) == 300
    assert assign_job.is_done(AssignSpec(stage=str(s2), stage_index=2, parent=str(s1)))
    # another stage's sidecar in its place
    with pytest.raises(StaleSidecarError, match="stage is 1, expected 2"):
        read_sidecar(s1 / "sidecars" / "00000.parquet", expect)
    # another shard's sidecar under this shard's name
    moved = tmp_path / "moved" / "00000.parquet"
    moved.parent.mkdir()
    shutil.copy(s2 / "sidecars" / "00001.parquet", moved)
    with pytest.raises(StaleSidecarError, match="shard is '00001', expected '00000'"):
        read_sidecar(moved, expect)
    reduce(s2)
    assert reduce_job.is_done(ReduceSpec(stage=str(s2)))
    assert not reduce_job.is_done(ReduceSpec(stage=str(s2), grid_per_cluster=4))  # another spec
    # stage 1 re-clustered (new centroids): stage 2's record is stale for the loader ...
    (s1 / "clusters" / "stats.json").unlink()
    cluster(s1, k=4, seed=99)
    with pytest.raises(StaleSidecarError, match="stale stage record"):
        current_record(StageDir(s2))
    assert not assign_job.is_done(AssignSpec(stage=str(s2), stage_index=2, parent=str(s1)))
    assert not assign_job.is_done(AssignSpec(stage=str(s1), stage_index=1))
    # ... and stage 2 cannot be assigned on stage 1's stale sidecars
    with pytest.raises(StaleSidecarError, match="stale stage record .* assign step of"):
        assign(s2, 2, parent=s1)
    assign(s1, 1)
    assert current_record(StageDir(s1)).meta.centroids_fp != expect.parent_fp
    assign(s2, 2, parent=s1)  # same centroids of its own, new parent labels: its summary is stale
    assert current_record(StageDir(s2)).meta.centroids_fp == expect.centroids_fp
    assert not reduce_job.is_done(ReduceSpec(stage=str(s2)))
    # re-embedding with another model: the clustering is no longer done, and once redone the
    # stage's own sidecars are stale
    _planted(s1, k=4, seed=1, model_fp="model1-retrained")
    assert not cluster_job.is_done(ClusterSpec(stage=str(s1), k=4, seed=99))
    cluster(s1, k=4, seed=99)
    with pytest.raises(StaleSidecarError, match="stale stage record"):
        current_record(StageDir(s1))


def test_killed_assign_resumes_to_the_same_sidecars(tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    for d in (clean, killed):
        _planted(d, n_shards=60, per_shard=500, k=8, seed=3)
        cluster(d, k=8)
    assign(clean, 1)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.assign", "--stage", str(killed), "--stage-index", "1"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sidecars = killed / "sidecars"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(sidecars.glob("*.parquet"))) < 3:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(sidecars.glob("*.parquet")))
    assert 3 <= done < 60, f"{done} sidecars when killed"
    # a file cut short by some other writer is not trusted either
    victim = sorted(sidecars.glob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    r = run_cli("pipeline.assign", "--stage", str(killed), "--stage-index", "1")
    assert r.returncode == 0, r.stderr
    for path in sorted((clean / "sidecars").glob("*.parquet")):
        a, b = pq.read_table(path), pq.read_table(sidecars / path.name)
        assert a.equals(b)
        assert a.schema.metadata == b.schema.metadata
    assert not list(sidecars.glob(".*tmp"))


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """An untrained tiny model saved as a stage artifact."""
    torch.manual_seed(0)
    model, *_ = models.create("mcl-tiny-vit")
    out = tmp_path_factory.mktemp("model")
    return models.save_model(model, "mcl-tiny-vit", models.model_config("mcl-tiny-vit"), out)


def test_embed_keys_follow_the_good_samples_of_broken_shards(tmp_path, tiny_shards, random_model):
    import tarfile
    with tarfile.open(tiny_shards / "00001.tar") as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    # drop a caption (failed sample), corrupt an image, repeat a key: in the middle of the shard
    broken = [(n, b) for n, b in members if n != "000010005.txt"]
    broken = [(n, os.urandom(200) if n == "000010007.jpg" else b) for n, b in broken]
    broken += [(n, b) for n, b in members if n.startswith("000010003.")]
    data = tmp_path / "shards"
    data.mkdir()
    write_raw_tar(data / "00001.tar", broken)
    (data / "00000.tar").write_bytes((tiny_shards / "00000.tar").read_bytes())
    good = {s["__key__"]: s for s in read_samples(str(data), ProblemLog(logger=None))}
    assert len(good) == 200 + 198
    stage = tmp_path / "stage1"
    embed(EmbedSpec(model=str(random_model), data=str(data), out=str(stage), batch_size=64, workers=2), progress=False)
    z = read_embeddings(stage / "embeddings" / "00001.npz", ("embeddings", "keys", "captions", "attributes"))
    assert sorted(z["keys"].tolist()) == sorted(k for k in good if k.startswith("00001"))
    assert "000010005" not in z["keys"] and "000010007" not in z["keys"]
    assert np.allclose(np.linalg.norm(z["embeddings"].astype(np.float32), axis=1), 1, atol=2e-3)
    for key, caption in zip(z["keys"].tolist(), z["captions"].tolist()):
        assert caption == good[key]["text"]
    # the embedding under each key is that sample's own image embedding
    model, _, pre, _ = models.create("", pretrained=str(random_model))
    k0 = z["keys"].tolist()[10]
    with torch.no_grad():
        e = torch.nn.functional.normalize(model.encode_image(pre(good[k0]["image"])[None]), dim=-1)[0].numpy()
    assert np.allclose(e, z["embeddings"][10].astype(np.float32), atol=3e-3)
    cluster(stage, k=3)
    assign(stage, 1)
    keys, clusters, _ = read_sidecar_columns(stage / "sidecars" / "00001.parquet")
    assert keys == z["keys"].tolist()
    # a rerun skips the shards already embedded by this model
    r = run_cli("pipeline.embed", "--model", str(random_model), "--data", str(data), "--out", str(stage))
    assert r.returncode == 0 and "2 of 2 shards already embedded" in r.stderr
    r = run_cli("pipeline.reduce", "--stage", str(stage), "--data", str(data))
    assert r.returncode == 0, r.stderr
    from PIL import Image
    assert Image.open(stage / "clusters" / "grid.png").size[1] == 3 * 66


def test_purity_counts_each_clusters_majority_value():
    from pipeline.metrics import attribute_purity

    labels = ['{"a": "x", "b": 1}', '{"a": "y", "b": 1}', '{"a": "x", "b": 2}', '{"a": "x", "b": 2}']
    assert attribute_purity(np.array([0, 0, 1, 1]), labels) == {"a": 0.75, "b": 1.0}
    assert attribute_purity(np.array([0, 1, 0, 1]), labels) == {"a": 0.75, "b": 0.5}
