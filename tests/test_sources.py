"""Several sources in one data spec, and shards that fail to read.

img2dataset names every output folder's shards 00000.tar on, so two folders joined with
`::` have the same shard names: their embeddings and sidecars must not overwrite each
other. A shard that cannot be read is read again, and never recorded as done.
"""
from __future__ import annotations

import collections
import shutil

import pytest
import torch

from common.cli import UsageError, run_main
from pipeline import models
from pipeline.artifacts import read_embeddings, read_sidecar_columns, shard_names
from pipeline.assign import AssignSpec, assign
from pipeline.cluster import ClusterSpec, cluster
from pipeline.embed import EmbedSpec, embed, main as embed_main
from pipeline.loader.global_stream import read_index
from pipeline.loader.groups import label_table
from pipeline.loader.labels import SidecarLabeler
from pipeline.reduce import ReduceSpec, reduce
from pipeline.stage import StageDir, labels_for_training
from shards import reader
from shards.reader import ProblemLog, expand_urls, read_samples

_real_open_stream = reader.open_stream


def test_shard_names_are_bare_stems_unless_they_collide():
    assert shard_names(["/d/a/00000.tar", "/d/a/00001.tar"]) == ["00000", "00001"]
    assert shard_names(["/d/a/00000.tar", "/d/b/00000.tar", "/d/a/00001.tar"]) == \
        ["a__00000", "b__00000", "a__00001"]  # one depth for every shard
    assert shard_names(["/x/a/s/00000.tar", "/y/a/s/00000.tar"]) == ["x__a__s__00000", "y__a__s__00000"]
    assert shard_names(["http://h1/cc/00000.tar", "http://h2/cc/00000.tar"]) == ["h1__cc__00000", "h2__cc__00000"]
    assert shard_names(["pipe:curl -s http://h/cc.v2/00000.tar", "/d/a/00000.tar"]) == ["cc.v2__00000", "a__00000"]
    assert shard_names(["/d/a/00000.tar.gz", "/d/a/00001.tar"]) == ["00000", "00001"]


def test_a_shard_listed_twice_is_refused_with_one_line(tmp_path):
    for urls in (["/d/a/00000.tar", "/d/a/00000.tar"], ["/d/a/00000.tar", "/d/a/../a/00000.tar"]):
        with pytest.raises(UsageError, match="shard /d/a/.*00000.tar is listed twice in the data spec") as exc:
            shard_names(urls)
        assert "\n" not in str(exc.value)
    with pytest.raises(UsageError, match="listed twice"):
        StageDir(tmp_path).sidecar_paths(["/d/a/00000.tar", "/d/a/00000.tar"])


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    torch.manual_seed(0)
    model, *_ = models.create("mcl-tiny-vit")
    return models.save_model(model, "mcl-tiny-vit", models.model_config("mcl-tiny-vit"),
                             tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory, tiny_shards):
    """Two img2dataset-style folders of 2 shards each, both named 00000.tar and 00001.tar;
    b/00001.tar is a copy of a/00000.tar, so keys repeat across shards too."""
    root = tmp_path_factory.mktemp("sources")
    for folder, sources in (("a", ("00000", "00001")), ("b", ("00002", "00000"))):
        (root / folder).mkdir()
        for i, src in enumerate(sources):
            shutil.copy(tiny_shards / f"{src}.tar", root / folder / f"{i:05d}.tar")
    return root


def test_two_img2dataset_folders_joined_lose_no_sample(tmp_path, two_folders, random_model):
    spec = f"{two_folders / 'a'}::{two_folders / 'b'}"
    urls = expand_urls(spec)
    assert [u.rsplit("/", 2)[-2:] for u in urls] == [["a", "00000.tar"], ["a", "00001.tar"], ["b", "00000.tar"],
                                                      ["b", "00001.tar"]]
    stage = StageDir(tmp_path / "stage1")
    embed(EmbedSpec(model=str(random_model), data=spec, out=str(stage.path), batch_size=128, workers=0), progress=False)
    assert sorted(p.name for p in stage.embeddings_dir.glob("*.npz")) == \
        ["a__00000.npz", "a__00001.npz", "b__00000.npz", "b__00001.npz"]
    assert [read_embeddings(p)["keys"].size for p in stage.embedding_paths(urls)] == [200] * 4
    cluster(ClusterSpec(stage=str(stage.path), k=3))
    assign(AssignSpec(stage=str(stage.path), stage_index=1))
    stats = reduce(ReduceSpec(stage=str(stage.path), data=spec, grid_per_cluster=2))
    assert sorted(p.name for p in stage.sidecars_dir.glob("*.parquet")) == \
        ["a__00000.parquet", "a__00001.parquet", "b__00000.parquet", "b__00001.parquet"]
    assert stats["groups"]["samples"] == 800 and sum(stats["cluster_sizes"]) == 800
    # b/00001 is a/00000 again: the same keys, each shard's own sidecar
    assert read_sidecar_columns(stage.sidecar_paths(urls)[3])[0] == read_sidecar_columns(stage.sidecar_paths(urls)[0])[0]
    # the training's readers find every sample's label, per shard
    meta = labels_for_training(stage, urls)
    index = read_index(stage, urls, tuple(meta.ks))
    assert len(index.key_hash) == 800 and sorted(collections.Counter(index.shard.tolist()).values()) == [200] * 4
    sizes = collections.Counter()
    for path in stage.sidecar_paths(urls):
        sizes.update(read_sidecar_columns(path)[2].tolist())
    labeler = SidecarLabeler(stage, meta, label_table(sizes, meta.ks, 0), paths=dict(zip(urls, stage.sidecar_paths(urls))))
    problems = ProblemLog(logger=None)
    labels = [labeler(s) for s in read_samples(spec, problems, decode=False)]
    assert len(labels) == 800 and all(lab is not None for lab in labels) and problems.total == 0


def _failing_reads(monkeypatch, name: str, failures: int | None):
    """Opening the shards ending in `name` fails `failures` times (None: always)."""
    real = reader.open_stream
    calls = collections.Counter()

    def open_stream(url):
        if url.endswith(name):
            calls[url] += 1
            if failures is None or calls[url] <= failures:
                raise OSError(5, "Input/output error")
        return real(url)

    monkeypatch.setattr(reader, "open_stream", open_stream)
    return calls


def test_a_shard_unreadable_once_is_read_again(tmp_path, tiny_shards, random_model, monkeypatch, caplog):
    calls = _failing_reads(monkeypatch, "00001.tar", failures=1)
    stage = StageDir(tmp_path)
    with caplog.at_level("WARNING", logger="pipeline.embed"):
        embed(EmbedSpec(model=str(random_model), data=str(tiny_shards), out=str(tmp_path), batch_size=64, workers=0,
                        retry_wait=0.01), progress=False)
    assert sum(calls.values()) == 2
    assert any("00001.tar: unreadable" in r.getMessage() and "attempt 1 of 3" in r.getMessage() for r in caplog.records)
    z = read_embeddings(stage.embeddings_dir / "00001.npz")
    assert z["keys"].size == 200 and len(set(z["keys"].tolist())) == 200  # no sample twice from the failed read


def test_a_shard_never_readable_gets_no_file_and_exit_2_and_a_rerun_reads_it(tmp_path, tiny_shards, random_model,
                                                                              monkeypatch, capsys):
    calls = _failing_reads(monkeypatch, "00001.tar", failures=None)
    argv = ["--model", str(random_model), "--data", str(tiny_shards), "--out", str(tmp_path), "--workers", "0",
            "--read-attempts", "2", "--retry-wait", "0"]
    with pytest.raises(SystemExit) as exc:
        run_main(embed_main, "python -m pipeline.embed", argv)
    assert exc.value.code == 2 and sum(calls.values()) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "00001.tar could not be read" in err[0] and "2 attempts" in err[0], err
    stage = StageDir(tmp_path)
    assert sorted(p.name for p in stage.embeddings_dir.glob("*.npz")) == ["00000.npz", "00002.npz"]
    monkeypatch.setattr(reader, "open_stream", _real_open_stream)  # the storage is back
    embed(EmbedSpec(model=str(random_model), data=str(tiny_shards), out=str(tmp_path), workers=0), progress=False)
    assert read_embeddings(stage.embeddings_dir / "00001.npz")["keys"].size == 200

