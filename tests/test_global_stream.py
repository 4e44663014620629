"""The global-batch loader's data path (pipeline.loader.global_stream): 4 ranks x 2 DataLoader
workers as processes of one machine, each given its rank and the world size."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from torchvision import transforms

from common.cli import UsageError
from pipeline.loader.labels import stable_hash64
from pipeline.loader.workers import make_loader
from pipeline.loader.global_batches import PAD
from pipeline.loader.global_stream import GlobalBatchStream, SampleIndex, load_index
from shards.reader import PROBLEM_KINDS, expand_urls, read_samples

WORLD, BATCH, WORKERS = 4, 8, 2
TRANSFORM = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])


def tokenize(texts):
    return torch.tensor([[len(t), sum(map(ord, t)) % 997] for t in texts], dtype=torch.int64)


@pytest.fixture(scope="module")
def uneven(tiny_shards):
    """A random-access index of the tiny world with labels of two levels (K = 2, then 6):
    c1 = red background or not (150 / 450 samples), c2 = shape x count. Under c1 = 0 the
    groups (~25) are below one global batch (32) and fall back; under c1 = 1 (~75) they
    hold two global batches and a leftover each."""
    urls = expand_urls(str(tiny_shards))
    shard, offset, length, label, keys = [], [], [], [], []
    for i, url in enumerate(urls):
        for s in read_samples(url, decode=False):
            a = s["json"]["attributes"]
            c1 = 0 if a["background"] == "red" else 1
            c2 = ["circle", "square", "triangle"].index(a["shape"]) * 2 + (int(a["count"]) - 1)
            start, end = s["__span__"]
            shard.append(i), offset.append(start), length.append(end - start), label.append(c1 * 6 + c2)
            keys.append(s["__key__"])
    index = SampleIndex(urls, np.array(shard, np.int32), np.array(offset), np.array(length),
                        np.array([stable_hash64(k) for k in keys]), np.array(label), (2, 6), {})
    return index, keys


def _epoch(index, rank, start=None, epoch=0, workers=WORKERS):
    stream = GlobalBatchStream(index, TRANSFORM, tokenize, BATCH, seed=5, rank=rank, world_size=WORLD)
    stream.set_epoch(epoch, start)
    return stream, list(make_loader(stream, workers, seed=1))


def test_every_step_of_four_ranks_draws_from_one_group_and_every_sample_once(uneven):
    index, keys = uneven
    runs = [_epoch(index, r) for r in range(WORLD)]
    plan = runs[0][0].plan
    assert len({len(batches) for _, batches in runs}) == 1 == len({s.plan.steps.tobytes() for s, _ in runs})
    assert len(runs[0][1]) == len(plan.pure) == runs[0][0].steps_per_epoch()
    stream = runs[0][0]
    seen, mixed = [], 0
    for step, pure in enumerate(plan.pure):
        batches = [batches[step] for _, batches in runs]
        labels = torch.cat([b.labels[b.valid] for b in batches]).tolist()
        step_keys = [k for b in batches for k, v in zip(b.keys, b.valid.tolist()) if v]
        seen += step_keys
        # each entry carries its group, the one the plan put it in
        want = [int(stream.group[i]) for i in plan.steps[step] if i != PAD]
        assert sorted(labels) == sorted(want)
        if pure:
            assert len(labels) == WORLD * BATCH and len(set(labels)) == 1, step
        else:
            mixed += 1
    assert mixed == plan.stats.mixed_steps > 0 and plan.stats.pure_steps > mixed
    assert sorted(seen) == sorted(keys)  # every sample once, across ranks; nothing dropped
    # groups below one global batch (red-background ones, ~25 each) fell back to their parent: counted
    sizes = np.bincount(index.label)
    assert plan.stats.fallback_samples == int(sizes[sizes < WORLD * BATCH].sum()) > 0
    # the bucketing counters of the epoch, as the trainer sums them over workers and ranks
    last = {}
    for _, batches in runs:
        for b in batches:
            last[(id(batches), b.info.worker)] = b.info.stats
    assert sum(s.samples for s in last.values()) == len(keys)
    assert sum(s.pure_batches for s in last.values()) == WORLD * plan.stats.pure_steps


def test_a_resumed_epoch_continues_with_the_same_batches(uneven):
    """Resumed after 5 steps (worker 0 had made 3, worker 1 two): the batches that follow
    are those of the uninterrupted epoch, in the same order, images included."""
    index, _ = uneven
    _, full = _epoch(index, rank=2, epoch=1)
    _, rest = _epoch(index, rank=2, start={0: 3, 1: 2}, epoch=1)
    assert len(rest) == len(full) - 5
    for a, b in zip(full[5:], rest):
        assert a.keys == b.keys and torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)
    positions = {}
    for b in rest:
        positions[b.info.worker] = b.info.made
    assert sum(positions.values()) == len(full)  # the positions a checkpoint would record add up


@pytest.mark.parametrize("damage", ["offsets", "keys"])
def test_a_shard_rewritten_since_indexing_costs_its_samples_not_the_run(uneven, damage):
    """An index entry that no longer points at its sample (the shard was rewritten: the
    bytes are no sample, or another one) is a masked entry, counted for each sample."""
    index, _ = uneven
    fields = dict(index.__dict__)
    if damage == "offsets":
        fields["offset"] = index.offset + 7
    else:  # every span still holds a sample, but shard 0's samples are in another order
        fields["key_hash"] = np.where(index.shard == 0, np.roll(index.key_hash, 1), index.key_hash)
    stream, batches = _epoch(SampleIndex(**fields), rank=0, workers=0)
    share = stream.mine[stream.mine != PAD]
    damaged = int((index.shard[share] == 0).sum()) if damage == "keys" else len(share)
    assert sum(int(b.valid.sum()) for b in batches) == len(share) - damaged > 0 or damage == "offsets"
    counts = dict(zip(PROBLEM_KINDS, batches[-1].info.problems))
    assert counts["unreadable_shard"] == damaged > 0, counts


def test_shards_that_cannot_be_read_by_offset_are_refused_up_front(tmp_path):
    from pipeline.stage import StageDir
    with pytest.raises(UsageError, match="uncompressed .tar"):
        load_index(StageDir(tmp_path), [str(tmp_path / "00000.tar.gz")])
    with pytest.raises(UsageError, match="local or mounted"):
        load_index(StageDir(tmp_path), ["s3://bucket/00000.tar"])


def test_every_rank_maps_one_stage_index_instead_of_reading_every_sidecar(tmp_path, quick_demo, monkeypatch):
    """The reduce step writes the stage's index once; the loader then reads no sidecar, and
    maps the same samples, spans, key hashes and labels the sidecars hold. A stage clustered
    anew makes the index stale: the loader reads the sidecars again."""
    import json
    import shutil

    import pyarrow.parquet as pq

    from pipeline.loader import global_stream, stage_index
    from pipeline.reduce import ReduceSpec, reduce
    from pipeline.stage import StageDir, current_record

    demo = quick_demo[0] / "seed0" / "mcl"
    urls = expand_urls(json.loads((demo / "run_config.json").read_text())["data"])
    stage = StageDir(tmp_path / "stage1")
    shutil.copytree(demo / "stage1", stage.path, ignore=shutil.ignore_patterns("checkpoints", "superseded"))
    shutil.rmtree(stage_index.index_dir(stage), ignore_errors=True)
    from_sidecars = global_stream.read_index(stage, urls, current_record(stage).meta.ks)
    reduce(ReduceSpec(stage=str(stage.path)))

    def no_sidecar_reads(*args, **kwargs):
        raise AssertionError(f"a sidecar was read: {args[0]}")
    monkeypatch.setattr(pq, "read_table", no_sidecar_reads)
    monkeypatch.setattr(pq, "read_schema", no_sidecar_reads)
    mapped = load_index(stage, urls)
    assert isinstance(mapped.label, np.memmap) or isinstance(getattr(mapped.label, "base", None), np.memmap)
    for column in ("shard", "offset", "length", "key_hash", "label"):
        assert np.array_equal(np.asarray(getattr(mapped, column)), getattr(from_sidecars, column)), column
    assert mapped.urls == urls and mapped.ks == from_sidecars.ks and mapped.skipped == from_sidecars.skipped
    monkeypatch.undo()

    np.save(stage.centroids, np.load(stage.centroids)[::-1].copy())  # the stage record changes
    assert stage_index.read(stage, urls) is None
