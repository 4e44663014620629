"""Groups sized for the batch: the measured and forecast shares, and the split clustering."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import split_clusters
from pipeline.group_sizing import forecast, shares, simulate_sizes, split_sizes
from pipeline.loader.global_batches import plan_epoch
from pipeline.loader.groups import coarse_groups


def test_the_shares_are_those_of_the_loaders_epoch_plan():
    rng = np.random.default_rng(0)
    ks = (5, 6)
    sizes = simulate_sizes(20_000, ks, alpha=1.0, seed=3)
    packed = np.repeat(np.array(list(sizes), np.int64), list(sizes.values()))
    rng.shuffle(packed)
    g = 256
    group, parent, fell = coarse_groups(packed, ks, g)
    stats = plan_epoch(group, parent, g, seed=0, epoch=0, fell_back=fell).stats
    found = shares(sizes, ks, g)
    assert found.samples == len(packed) == stats.samples
    assert found.pure == pytest.approx(stats.pure_samples / stats.samples)
    assert found.fallback == pytest.approx(stats.fallback_samples / stats.samples) and 0 < found.fallback < 1
    assert found.mixed == pytest.approx(1 - found.pure)


@pytest.mark.parametrize("n,k,g,target", [(100_000, 10, 1000, 4), (5_000, 10, 1000, 2), (999, 10, 1000, 4),
                                          (1_234_567, 10, 16_384, 4), (40_000, 3, 1000, 1)])
def test_a_split_plan_is_whole_global_batches_and_a_share_of_the_rest(n, k, g, target):
    plan = split_sizes(n, k, g, target)
    assert sum(plan) == n and 1 <= len(plan) <= k
    if n >= g:
        assert min(plan) >= g  # no child falls back
        rest = n - n // g * g
        assert sum(s % g for s in plan) == rest  # the parent's remainder alone goes to mixed steps
        assert max(plan) - min(plan) <= g + 1
        assert len(plan) == min(k, max(1, n // g // target))


def test_the_split_clustering_gives_every_parent_its_planned_children():
    rng = np.random.default_rng(0)
    n, d, g = 12_000, 8, 256
    x = rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    parents = rng.choice([3, 7, 11], size=n, p=[0.5, 0.3, 0.2]).astype(np.int64)
    sizes = {int(p): int((parents == p).sum()) for p in (3, 7, 11)}
    centroids, parent, child, bias, planned = split_clusters.fit(x, parents, sizes, 4, g, 2.0, 10, 0, True, False)
    assert sorted(set(parent.tolist())) == [3, 7, 11] and len(centroids) == len(planned)
    got = split_clusters.assign(x, parents, centroids, parent, child, bias)
    for p in (3, 7, 11):
        counts = np.bincount(got[parents == p], minlength=int((parent == p).sum()))
        want = np.array([s for s, q in zip(planned, parent.tolist()) if q == p])
        assert len(counts) == len(want) == len(split_sizes(sizes[p], 4, g, 2.0))
        assert np.abs(counts - want).max() <= 1  # fitted on all the points: the plan, exactly
        assert counts.min() >= g
    # a point is only ever given a child of its own parent: its parent's rows alone compete
    rows = {p: np.nonzero(parent == p)[0] for p in (3, 7, 11)}
    for i in range(0, n, 997):
        s = split_clusters.scores(x[i:i + 1], centroids, bias)[0]
        own = rows[int(parents[i])]
        assert got[i] == child[own[np.argmax(s[own])]]


def test_at_cc12m_scale_split_groups_keep_stage_3_mcl_where_flat_k_falls_back():
    n, ks = 12_000_000, (10, 10, 10)
    for g in (64 * 256, 8 * 1000):
        flat = forecast(n, ks, g)
        split = forecast(n, ks, g, target_batches=4)
        assert flat.fallback > 0.10 and flat.pure < 0.9
        assert split.fallback <= 0.05 and split.pure >= 0.9


def test_labels_too_fine_for_the_batch_are_refused_up_front_and_the_split_clustering_trains_them(
        tmp_path, tiny_shards, quick_demo):
    """Three stages of K = 4 on 600 samples at a global batch of 32: stage 3's 16 combined groups
    average 37 samples, and the forecast refuses the plan before anything runs; with the split
    clustering it plans none falling back. Then real labels: K = 8 under the demo's 4 stage-1
    groups, measured at a global batch of 64, are refused; cut into children of whole global
    batches (cluster.mode: split) none falls back, and stage 3 trains on them with none."""
    import json
    import re
    import shutil

    from conftest import REPO, run_cli
    from pipeline.assign import AssignSpec, assign
    from pipeline.cluster import ClusterSpec, cluster
    from pipeline.reduce import ReduceSpec, reduce
    from common.cli import UsageError

    args = ["launch", "run", "--config", str(REPO / "configs" / "tiny_mcl.yaml"), f"run_dir={tmp_path / 'r'}",
            f"data={tiny_shards}", "mmvp=", "stages=3", "train.max_fallback=0.1"]
    refused = run_cli(*args, "--dry-run")
    assert refused.returncode == 2, refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert re.search(r"stage 3 \(N=600, K=\[4, 4\]\): [0-9.]+% of samples would fall back to a coarser label at "
                     r"global batch 32 \(16 groups; train.max_fallback is 10%\); cluster.mode: split", line), line
    assert not (tmp_path / "r").exists()
    planned = run_cli(*args, "cluster.mode=split", "cluster.target_batches=2", "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert re.search(r"forecast +stage 3 on K=\[4, 4\] \(split\) at global batch 32: .* 0.0% fall back",
                     planned.stdout), planned.stdout

    # the demo's stage 1 (K = 4 over 600 samples) is the parent; its embeddings stand in for stage 2's
    demo = quick_demo[0] / "seed0" / "mcl"
    data = json.loads((demo / "run_config.json").read_text())["data"]
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    shutil.copytree(demo / "stage1", stage1, ignore=shutil.ignore_patterns("checkpoints", "superseded"))
    stage2.mkdir()
    shutil.copytree(demo / "stage1" / "embeddings", stage2 / "embeddings")
    cluster(ClusterSpec(stage=str(stage2), k=8, seed=1))  # flat
    assign(AssignSpec(stage=str(stage2), stage_index=2, parent=str(stage1)))
    with pytest.raises(UsageError, match=r"labels: [0-9.]+% of samples fall back to a coarser label at global batch "
                                         r"64 \(\d+ groups; train.max_fallback is 10%\)"):
        reduce(ReduceSpec(stage=str(stage2), global_batch=64, max_fallback=0.1))
    assert not (stage2 / "clusters" / "assign_stats.json").exists()  # refused: not done
    cluster(ClusterSpec(stage=str(stage2), k=8, mode="split", parent=str(stage1), global_batch=64, target_batches=1))
    assign(AssignSpec(stage=str(stage2), stage_index=2, parent=str(stage1)))
    stats = reduce(ReduceSpec(stage=str(stage2), global_batch=64, max_fallback=0.1))
    measured = stats["groups"]["batch_shares"]
    assert measured["fallback"] == 0 and measured["groups"] > 4 and measured["pure"] > 0.8

    from pipeline.artifacts import read_sidecar_columns
    parent, sizes = {}, {}
    for f in sorted((stage1 / "sidecars").glob("0*.parquet")):
        keys, _, labels = read_sidecar_columns(f)
        parent.update(zip(keys, labels.tolist()))
    for f in sorted((stage2 / "sidecars").glob("0*.parquet")):
        keys, _, labels = read_sidecar_columns(f)
        assert [lab // 8 for lab in labels.tolist()] == [parent[k] for k in keys]  # children of their own parent
        for lab in labels.tolist():
            sizes[lab] = sizes.get(lab, 0) + 1
    assert min(sizes.values()) >= 64  # none below a global batch

    stage3 = tmp_path / "stage3"
    r = run_cli("pipeline.train", f"data={data}", f"out={stage3}", f"labels=sidecars:{stage2}", "steps=3",
                "batch_size=64", "workers=0", "threads=1", "warmup=1", "model=mcl-tiny-vit")
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"\d+ pseudo-labels, 600 samples; 0 samples in groups below 64 fall back", r.stderr), r.stderr
    epochs = [json.loads(line) for line in (stage3 / "loader_stats.jsonl").read_text().splitlines()]
    assert epochs and all(e["fallback_samples"] == 0 for e in epochs)
