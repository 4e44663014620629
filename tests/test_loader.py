"""The cluster-bucketed loader: same-label batches, every sample once, bounded memory."""
from __future__ import annotations

import collections
import os
import tarfile

import numpy as np
import open_clip
import pytest
import torch

from conftest import write_raw_tar
from pipeline import models
from pipeline.artifacts import SidecarMeta, write_sidecar
from pipeline.stage import StageDir
from pipeline.loader.buckets import BucketStats, _take_fullest, plan_batches
from pipeline.loader.groups import coarsen_labels
from pipeline.loader.groups import label_table
from pipeline.loader.labels import SidecarLabeler
from pipeline.loader.slot import TrainStream
from pipeline.loader.workers import make_loader
from shards.reader import PROBLEM_KINDS, ProblemLog, expand_urls, read_samples

BG = {"red": 0, "green": 1, "blue": 2, "yellow": 3}


# --- the policy alone --------------------------------------------------------------------


def _stream(labels, parents=None):
    parents = parents or [lab // 10 for lab in labels]
    return [(lab, par, (i, lab)) for i, (lab, par) in enumerate(zip(labels, parents))]


def test_plan_uses_every_sample_once_and_pure_batches_when_groups_fill():
    rng = np.random.default_rng(0)
    labels = rng.integers(4, size=1000).tolist()
    stats = BucketStats()
    batches = list(plan_batches(_stream(labels), 16, cap=1000, stats=stats))
    seen = [item for b in batches for item in b]
    assert sorted(i for i, _ in seen) == list(range(1000))
    pure = [b for b in batches if len({lab for _, lab in b}) == 1 and len(b) == 16]
    assert len(pure) == stats.pure_batches and stats.pure_batches >= 1000 // 16 - 4
    assert stats.mixed_batches == len(batches) - len(pure) <= 4 and stats.early_batches == 0
    assert stats.short_batches == (1 if 1000 % 16 else 0)


def test_memory_stays_under_the_cap_when_labels_outnumber_it():
    rng = np.random.default_rng(1)
    labels = rng.integers(500, size=5000).tolist()  # 500 labels, a cap of 64 samples
    stats = BucketStats()
    batches = list(plan_batches(_stream(labels), 16, cap=64, stats=stats))
    assert stats.max_buffered <= 64 and stats.early_batches > 0
    assert sorted(i for b in batches for i, _ in b) == list(range(5000))
    assert all(len(b) == 16 for b in batches[:-1])
    # an early batch is the fullest bucket topped up from its parent label's buckets first
    buckets = {11: [(11, "a")] * 5, 12: [(12, "b")] * 2, 21: [(21, "c")] * 4}
    batch = _take_fullest(buckets, {11: 1, 12: 1, 21: 2}, 8)
    assert [lab for lab, _ in batch] == [11] * 5 + [12] * 2 + [21]
    assert buckets == {21: [(21, "c")] * 3}


def test_small_groups_fall_back_to_their_parent_level_by_level():
    ks = (3, 4)  # label = c1 * 4 + c2
    sizes = {0: 100, 1: 8, 2: 8, 3: 8, 4: 2, 5: 1, 8: 40, 9: 40}
    mapping = coarsen_labels(sizes, ks, min_size=20)
    assert mapping[0] == (2, 0) and mapping[8] == (2, 8) and mapping[9] == (2, 9)
    assert mapping[1] == mapping[2] == mapping[3] == (1, 0)  # 8 < 20 alone; 24 together under c1 = 0
    assert mapping[4] == mapping[5] == (0, 0)  # c1 = 1 has only 3 samples: up to the root
    table = label_table(sizes, ks, 20)
    assert table[1][0] == table[2][0] != table[0][0] and table[1][2] and not table[0][2]
    assert table[1][1] == table[4][0]  # the parent of (1, 0) is the root


# --- the loader over real shards and sidecars ------------------------------------------------


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny_shards):
    """Sidecars for the tiny shards: c1 = background (4), c2 = count - 1 (2)."""
    stage = tmp_path_factory.mktemp("stage2")
    meta = SidecarMeta(stage=2, k=2, ks=(4, 2), model_fp="m", centroids_fp="c", parent_fp="p")
    truth = {}
    for url in expand_urls(str(tiny_shards)):
        samples = list(read_samples(url, decode=False))
        keys = [s["__key__"] for s in samples]
        c1 = np.array([BG[s["json"]["attributes"]["background"]] for s in samples])
        c2 = np.array([s["json"]["attributes"]["count"] - 1 for s in samples])
        write_sidecar(StageDir(stage).sidecar(url), keys, c2, c1 * 2 + c2, meta)
        truth.update(zip(keys, (c1 * 2 + c2).tolist()))
    return stage, meta, truth


def _tiny_stream(tiny_shards, labeler, rank, world=2, batch=16, cap=64, seed=0):
    model_cfg = models.model_config("mcl-tiny-vit")
    transform = open_clip.image_transform(model_cfg["vision_cfg"]["image_size"], is_train=False)
    tokenizer = open_clip.get_tokenizer("mcl-tiny-vit")
    return TrainStream(expand_urls(str(tiny_shards)), transform, tokenizer, batch, None, seed, rank, world, 50,
                       labeler, bucket_cap=cap)


def _epoch(tiny_shards, labeler, workers=2, **kw):
    out = []
    for rank in (0, 1):
        stream = _tiny_stream(tiny_shards, labeler, rank, **kw)
        stream.set_epoch(0)
        stats = {}
        for batch in make_loader(stream, workers, seed=0):
            out.append((rank, batch.keys, batch.labels, batch.valid))
            stats[batch.info.worker] = batch.info.stats
        total = BucketStats()
        for s in stats.values():
            total = total.merge(s)
        out.append((rank, "stats", total, None))
    return out


def test_two_ranks_two_workers_yield_every_key_once_in_same_label_batches(tiny_shards, labelled):
    stage, meta, truth = labelled
    table = label_table(collections.Counter(truth.values()), meta.ks, min_size=0)
    labeler = SidecarLabeler(str(stage), meta, table)
    result = _epoch(tiny_shards, labeler, cap=256)  # room for every label's bucket: pure batches
    batches = [r for r in result if r[1] != "stats"]
    stats = [r[2] for r in result if r[1] == "stats"]
    keys = [k for _, ks, _, valid in batches for k, v in zip(ks, valid.tolist()) if v]
    assert collections.Counter(keys) == collections.Counter(list(truth))  # the data set, each key once
    mixed = 0
    for _, ks, labels, valid in batches:
        real = [truth[k] for k, v in zip(ks, valid.tolist()) if v]
        loss_labels = set(labels[valid].tolist())
        assert len(loss_labels) == len(set(real))  # the labels travel with the batch
        mixed += len(set(real)) > 1 or len(real) < 16
    assert mixed == sum(s.mixed_batches for s in stats)
    # 3 shards over 4 slots, 8 labels: at most 15 leftovers per label and slot end in mixed batches
    assert sum(s.pure_batches for s in stats) >= (600 - 3 * 8 * 15) // 16
    assert sum(s.samples for s in stats) == 600 and all(s.max_buffered <= 256 for s in stats)
    assert sum(s.early_batches for s in stats) == 0
    # same seed, rank and workers: the same batches
    again = [r for r in _epoch(tiny_shards, labeler, cap=256) if r[1] != "stats"]
    assert [(r, ks) for r, ks, _, _ in again] == [(r, ks) for r, ks, _, _ in batches]


def test_labels_outnumbering_the_cap_keep_memory_bounded(tiny_shards, labelled, tmp_path):
    stage, meta, truth = labelled
    # one label per 3 keys: 200 labels, far more than a 32-sample cap can hold
    many = {k: i // 3 for i, k in enumerate(sorted(truth))}
    meta2 = SidecarMeta(stage=2, k=200, ks=(1, 200), model_fp="m", centroids_fp="c", parent_fp="p")
    for url in expand_urls(str(tiny_shards)):
        keys = [s["__key__"] for s in read_samples(url, decode=False)]
        labels = np.array([many[k] for k in keys])
        write_sidecar(StageDir(tmp_path).sidecar(url), keys, labels, labels, meta2)
    table = label_table(collections.Counter(many.values()), meta2.ks, min_size=0)
    result = _epoch(tiny_shards, SidecarLabeler(str(tmp_path), meta2, table), cap=32)
    stats = [r[2] for r in result if r[1] == "stats"]
    keys = [k for r in result if r[1] != "stats" for k, v in zip(r[1], r[3].tolist()) if v]
    assert sorted(keys) == sorted(truth)
    assert all(0 < s.max_buffered <= 32 for s in stats) and sum(s.early_batches for s in stats) > 0


def test_a_sample_without_sidecar_entry(tiny_shards, labelled, tmp_path):
    stage, meta, truth = labelled
    url = expand_urls(str(tiny_shards))[0]
    import pyarrow.parquet as pq
    table = pq.read_table(StageDir(stage).sidecar(url))
    import pyarrow.compute as pc
    dropped = table.column("key")[5].as_py()
    keep = table.filter(pc.not_equal(table.column("key"), dropped))
    for u in expand_urls(str(tiny_shards)):
        src = StageDir(stage).sidecar(u)
        dst = StageDir(tmp_path).sidecar(u)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    write_sidecar(StageDir(tmp_path).sidecar(url), keep.column("key").to_pylist(), keep.column("cluster").to_numpy(),
                  keep.column("label").to_numpy(), meta)
    labels = label_table(collections.Counter(truth.values()), meta.ks, min_size=0)
    strict = SidecarLabeler(str(tmp_path), meta, labels)
    with pytest.raises(KeyError, match=f"no pseudo-label for key {dropped} of shard {url}"):
        list(read_and_label(url, strict))
    lenient = SidecarLabeler(str(tmp_path), meta, labels, missing="own")
    stream = _tiny_stream(tiny_shards, lenient, rank=0, world=1)
    stream.set_epoch(0)
    batches = list(make_loader(stream, 0, seed=0))
    keys = [k for b in batches for k, v in zip(b.keys, b.valid.tolist()) if v]
    assert sorted(keys) == sorted(truth)
    assert batches[-1].info.stats.missing_labels == 1


def test_short_batches_and_padding_batches_are_masked_entries(tiny_shards, labelled):
    """A short bucketed batch is padded to the batch size, and a rank whose data ran out gets
    a batch of padding alone: blank image, empty caption, label -1, caption id 0, not valid."""
    stage, meta, truth = labelled
    table = label_table(collections.Counter(truth.values()), meta.ks, min_size=0)
    stream = _tiny_stream(tiny_shards, SidecarLabeler(str(stage), meta, table), rank=0, world=1)
    stream.set_epoch(0)
    batches = list(make_loader(stream, 2, seed=0))  # Batches pickled back from two worker processes
    short = [b for b in batches if not b.valid.all()]
    padding = stream.padding()
    assert short and padding.info is None and not padding.valid.any()
    blank, empty = padding.images[0], padding.tokens[0]
    for b in short + [padding]:
        n = int(b.valid.sum())
        assert b.images.shape == batches[0].images.shape and b.tokens.shape == batches[0].tokens.shape
        assert b.valid[:n].all() and all(b.keys[:n]) and b.keys[n:] == [""] * (16 - n)
        assert (b.labels[n:] == -1).all() and (b.caption_ids[n:] == 0).all()
        assert all(torch.equal(img, blank) for img in b.images[n:])
        assert all(torch.equal(tok, empty) for tok in b.tokens[n:])
    moved = short[0].to(torch.device("cpu"))
    assert moved.keys == short[0].keys and moved.info == short[0].info and torch.equal(moved.images, short[0].images)


def read_and_label(url, labeler):
    for s in read_samples(url, ProblemLog(logger=None), decode=False):
        yield labeler(s)


def test_shards_go_to_slots_balanced_by_their_sample_counts():
    """One big shard and ten small ones over 2 slots: striped, one slot would read 150
    samples and the other 50 (and idle on padding for half an epoch); balanced, 100 each.
    Shards of equal size are still dealt every slots-th."""
    from pipeline.loader.slot import shards_for_slot
    urls = [f"{i:05d}.tar" for i in range(11)]
    sizes = [100] + [10] * 10
    by_url = dict(zip(urls, sizes))
    striped = [sum(by_url[u] for u in shards_for_slot(urls, s, 2)) for s in range(2)]
    balanced = [sum(by_url[u] for u in shards_for_slot(urls, s, 2, sizes=sizes)) for s in range(2)]
    assert striped == [150, 50] and balanced == [100, 100]
    assert sorted(u for s in range(2) for u in shards_for_slot(urls, s, 2, sizes=sizes)) == urls  # each once
    equal = [10] * 11
    assert all(shards_for_slot(urls, s, 3, sizes=equal) == urls[s::3] for s in range(3))


@pytest.mark.parametrize("bucketed", [False, True])
def test_an_epoch_resumed_at_uneven_worker_positions_continues_in_order(tiny_shards, labelled, bucketed):
    """Resumed after 5 batches (worker 0 had made 3, worker 1 two), the batches that follow
    are those of the uninterrupted epoch in the same order, though the DataLoader asks its
    worker 0 first: the workers take their streams' roles rotated."""
    from pipeline.loader.labels import no_labels
    stage, meta, truth = labelled
    labeler = SidecarLabeler(str(stage), meta, label_table(collections.Counter(truth.values()), meta.ks,
                                                                  min_size=0)) if bucketed else no_labels

    def epoch(start=None):
        stream = _tiny_stream(tiny_shards, labeler, 0, cap=256 if bucketed else None)
        stream.worker_batches = 8
        stream.set_epoch(1, start)
        return list(make_loader(stream, 2, seed=0))

    full, rest = epoch(), epoch({0: 3, 1: 2})
    assert len(rest) == len(full) - 5 > 0
    assert [b.keys for b in rest] == [b.keys for b in full[5:]]
    assert all(torch.equal(a.images, b.images) for a, b in zip(full[5:], rest))
    assert [(b.info.worker, b.info.made) for b in rest] == [(b.info.worker, b.info.made) for b in full[5:]]
    # the epoch's counters, from the checkpoint's and the resumed workers', are the uninterrupted ones
    whole, resumed = _resumed_progress(full, rest, 5)
    assert resumed.counters() == whole.counters() and resumed.positions == whole.positions
    if bucketed:
        assert sum(s.samples for s in whole.stats.values()) == sum(k != "" for b in full for k in b.keys)
        assert sum(s.pure_batches for s in whole.stats.values()) > 0


def _resumed_progress(full, rest, consumed):
    """LoaderProgress of an uninterrupted epoch's batches `full`, and that of the same epoch
    checkpointed after `consumed` batches and resumed with the batches `rest`."""
    from pipeline.loader.progress import LoaderProgress

    def progress(batches, start=None, counters=None):
        p = LoaderProgress(start or {}, counters)
        for b in batches:
            p.update(b.info)
        return p
    before = progress(full[:consumed])
    return progress(full), progress(rest, before.positions, before.counters())


def test_data_problems_before_a_resume_count_once_in_the_epoch(tiny_shards, tmp_path):
    """Shard 1 (worker 1's) has every 5th image garbled, shards 0 and 2 (worker 0's) the captions
    of their first three samples missing. Each worker makes 20 batches of 16: worker 1 reads its
    200 samples and starts over, meeting its corrupt images again. Resumed after 5 batches, the
    epoch counts each problem once, as without the resume: those met before it (images the
    resumed worker skips undecoded, then meets again; captions it reads again) included."""
    from pipeline.loader.labels import no_labels
    data = tmp_path / "shards"
    data.mkdir()
    for i, shard in enumerate(["00000", "00001", "00002"]):
        with tarfile.open(tiny_shards / f"{shard}.tar") as tf:
            members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
        keys = sorted({n.split(".")[0] for n, _ in members})
        garbled = set(keys[::5]) if i == 1 else set()
        members = [(n, os.urandom(200) if n.endswith(".jpg") and n.split(".")[0] in garbled else b)
                   for n, b in members if not (i != 1 and n.endswith(".txt") and n.split(".")[0] in keys[:3])]
        write_raw_tar(data / f"{shard}.tar", members)

    def epoch(start=None):
        stream = _tiny_stream(data, no_labels, 0, world=1, cap=None)
        stream.worker_batches = 20
        stream.set_epoch(0, start)
        return list(make_loader(stream, 2, seed=0))

    full, rest = epoch(), epoch({0: 3, 1: 2})
    whole, resumed = _resumed_progress(full, rest, 5)
    assert resumed.counters() == whole.counters()
    counts = dict(zip(PROBLEM_KINDS, map(sum, zip(*resumed.problems.values()))))
    assert counts["missing_caption"] == 6 and counts["corrupt_image"] == 40, counts

def test_a_worker_that_never_starts_is_started_again_with_the_same_batches(tiny_shards, tmp_path, monkeypatch, caplog):
    """What a worker stuck after fork (CPython 3.11's runtime lock) looks like to the rank: it never
    runs. start_batches notices within its timeout, shuts the loader down and starts it again;
    the epoch's batches are those of an undisturbed start."""
    import os
    import time

    from pipeline.loader import workers as data
    from pipeline.loader.labels import no_labels
    from pipeline.loader.workers import start_batches

    def keys(batches):
        return sorted(k for b in batches for k in b.keys if k)

    stream = _tiny_stream(tiny_shards, no_labels, rank=0, world=1)
    stream.set_epoch(0)
    want = keys(start_batches(stream, 2, seed=3))
    flag = tmp_path / "hang_once"
    flag.touch()
    real = data._mark_started

    def stuck_once(counter, worker_id):
        if worker_id == 1 and flag.exists():
            os.remove(flag)
            time.sleep(3600)  # never starts
        real(counter, worker_id)

    monkeypatch.setattr(data, "_mark_started", stuck_once)
    stream.set_epoch(0)
    t0 = time.monotonic()
    got = keys(start_batches(stream, 2, seed=3, timeout=5))
    assert got == want and len(got) == 600
    assert not flag.exists() and time.monotonic() - t0 < 60
    assert "1 of 2 DataLoader workers did not start within 5 s" in caplog.text
