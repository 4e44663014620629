"""Reading shards: specs, and every problem of real img2dataset output counted and skipped."""
from __future__ import annotations

import logging
import os

import pytest

from conftest import write_raw_tar
from common.cli import UsageError
from shards.generate import generate
from shards.reader import ProblemLog, expand_urls, read_samples


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_spec):
    out = tmp_path_factory.mktemp("world")
    generate(out, tiny_spec, 60, 20, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def good(world):
    """{key: {"jpg", "txt", "json"}} of shard 00000, raw bytes."""
    import tarfile
    samples: dict = {}
    with tarfile.open(world / "00000.tar") as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def _members(key, sample, exts=("jpg", "json", "txt"), **override):
    out = []
    for ext in exts:
        out.append((f"{key}.{ext}", override.get(ext, sample.get(ext))))
    return out


@pytest.fixture(scope="module")
def broken_shard(tmp_path_factory, good):
    from PIL import Image
    import io
    k = sorted(good)
    png = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(png, format="PNG")
    members = (
        _members("g0", good[k[0]])
        + _members("missing_image", good[k[1]], exts=("json", "txt"))
        + _members("missing_caption", good[k[2]], exts=("jpg", "json"))
        + _members("corrupt_jpeg", good[k[3]], jpg=os.urandom(300))
        + _members("truncated_jpeg", good[k[4]], jpg=good[k[4]]["jpg"][: len(good[k[4]]["jpg"]) // 2])
        + _members("empty_caption", good[k[5]], txt=b"")
        + _members("blank_caption", good[k[6]], txt=b"  \n\t")
        + _members("latin1_caption", good[k[7]], txt="caf\xe9 au lait".encode("latin-1"))
        + _members("g1", good[k[8]])
        + _members("g0", good[k[9]])  # the key again, later in the shard
        + _members("g2", good[k[10]])
        + [("g2.jpg", good[k[11]]["jpg"])]  # a second g2.jpg right after g2
        + _members("g3", good[k[12]], json=b"{not json")
        + [("g4.png", png.getvalue()), ("g4.txt", b"a red square")]
    )
    return write_raw_tar(tmp_path_factory.mktemp("broken") / "broken.tar", members)


def test_each_problem_is_counted_and_only_good_samples_come_out(broken_shard, caplog):
    problems = ProblemLog()
    with caplog.at_level(logging.WARNING, logger="shards.reader"):
        out = list(read_samples(str(broken_shard), problems))
    assert [s["__key__"] for s in out] == ["g0", "g1", "g2", "g3", "g4"]
    assert dict(problems.counts) == {
        "missing_image": 1, "missing_caption": 1, "corrupt_image": 2, "empty_caption": 2,
        "bad_text_encoding": 1, "duplicate_key": 2, "bad_json": 1,
    }
    assert out[3]["json"] is None and out[0]["json"]["key"] == "000000000"
    assert out[4]["image"].size == (8, 8) and out[4]["image_ext"] == "png"
    assert all(s["image"].mode == "RGB" and s["text"] for s in out)
    # reported once each, naming shard and key
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == problems.total
    assert any(str(broken_shard) in m and "key latin1_caption" in m and "bad_text_encoding" in m for m in lines)
    # a second pass over the same shard reports and counts nothing new
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shards.reader"):
        again = list(read_samples(str(broken_shard), problems))
    assert len(again) == 5 and problems.total == 10 and not caplog.records


def test_undecoded_reading_leaves_image_checks_to_the_decoder(broken_shard):
    problems = ProblemLog(logger=None)
    out = list(read_samples(str(broken_shard), problems, decode=False))
    assert {s["__key__"] for s in out} == {"g0", "g1", "g2", "g3", "g4", "corrupt_jpeg", "truncated_jpeg"}
    assert "corrupt_image" not in problems.counts and isinstance(out[0]["image"], bytes)


def test_empty_corrupt_truncated_and_unreadable_shards(tmp_path, world, good):
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "notatar.tar").write_bytes(os.urandom(4096))
    data = (world / "00000.tar").read_bytes()
    (tmp_path / "truncated.tar").write_bytes(data[: len(data) // 2 + 100])
    spec = "::".join(str(tmp_path / n) for n in ("empty.tar", "notatar.tar", "truncated.tar")) \
        + f"::pipe:cat {tmp_path}/gone.tar::{world}/00001.tar"
    problems = ProblemLog(logger=None)
    out = list(read_samples(spec, problems))
    kinds = {(p["kind"], os.path.basename(p["shard"].split()[-1])) for p in problems.items}
    assert ("empty_tar", "empty.tar") in kinds
    assert ("corrupt_tar", "notatar.tar") in kinds
    assert ("truncated_tar", "truncated.tar") in kinds
    assert ("unreadable_shard", "gone.tar") in kinds
    assert len(problems.per_shard[f"pipe:cat {tmp_path}/gone.tar"]) == 1  # one problem, not two
    truncated_keys = [s["__key__"] for s in out if s["__url__"].endswith("truncated.tar")]
    assert truncated_keys == sorted(good)[: len(truncated_keys)] and 5 < len(truncated_keys) < 20
    # the shard after the broken ones is read whole
    assert sum(s["__url__"].endswith("00001.tar") for s in out) == 20


def test_spec_forms(world):
    brace = expand_urls(f"{world}/{{00000..00001}}.tar")
    assert brace == [f"{world}/00000.tar", f"{world}/00001.tar"]
    joined = expand_urls(f"{world}/{{00000..00001}}.tar::{world}/00002.tar")
    assert len(joined) == 3 and expand_urls(str(world)) == joined
    assert expand_urls([f"{world}/00000.tar", f"pipe:cat {world}/00001.tar"])[1].startswith("pipe:")
    keys = [s["__key__"] for s in read_samples(f"pipe:cat {world}/00001.tar", decode=False)]
    assert keys == [f"00001{i:04d}" for i in range(20)]


def test_fsspec_urls(world):
    import fsspec
    with fsspec.open("memory://bucket/00002.tar", "wb") as f:
        f.write((world / "00002.tar").read_bytes())
    out = list(read_samples("memory://bucket/00002.tar"))
    assert [s["__key__"] for s in out] == [f"00002{i:04d}" for i in range(20)]
    assert out[0]["__url__"] == "memory://bucket/00002.tar"


@pytest.mark.parametrize("spec, message", [
    ("/nonexistent/{0..3}.tar", "/nonexistent/0.tar: no such shard"),
    ("", "names no shards"),
])
def test_bad_specs_are_usage_errors(spec, message):
    with pytest.raises(UsageError, match=message):
        expand_urls(spec)


def test_folder_without_shards(tmp_path):
    with pytest.raises(UsageError, match="holds no .tar shards"):
        expand_urls(str(tmp_path))


def test_a_tar_cut_anywhere_is_reported_and_keeps_its_complete_samples(tmp_path, world):
    import random
    data = (world / "00000.tar").read_bytes()
    full = [s["__key__"] for s in read_samples(str(world / "00000.tar"), decode=False)]
    end_blocks = len(data) - data.rstrip(b"\0").__len__()  # trailing zero padding
    rng = random.Random(0)
    for cut in sorted(rng.sample(range(1, len(data) - end_blocks), 40)):
        path = tmp_path / "cut.tar"
        path.write_bytes(data[:cut])
        problems = ProblemLog(logger=None)
        keys = [s["__key__"] for s in read_samples(str(path), problems, decode=False)]
        assert problems.counts["truncated_tar"] == 1, cut
        assert keys == full[: len(keys)], cut


def test_an_io_error_midway_is_an_unreadable_shard_and_keeps_the_samples_before_it(world, monkeypatch):
    import io

    import shards.reader as reader

    data = (world / "00000.tar").read_bytes()
    full = [s["__key__"] for s in read_samples(str(world / "00000.tar"), decode=False)]

    class Failing(io.BytesIO):
        def read(self, n=-1):
            if self.tell() > len(data) // 2:
                raise OSError(5, "Input/output error")
            return super().read(n)

    monkeypatch.setattr(reader, "open_stream", lambda url: Failing(data))
    problems = ProblemLog(logger=None)
    keys = [s["__key__"] for s in read_samples(str(world / "00000.tar"), problems, decode=False)]
    assert problems.counts["unreadable_shard"] == 1 and problems.counts["truncated_tar"] == 0
    assert "Input/output error" in problems.items[0]["detail"]
    assert 0 < len(keys) < len(full) and keys == full[:len(keys)]


def test_sample_counts_from_sizes_json_or_else_img2dataset_stats(tmp_path, world, caplog):
    import json
    import shutil

    from shards.reader import count_samples, shard_sizes

    for name in ("00000.tar", "00001.tar"):
        shutil.copy(world / name, tmp_path / name)
    urls = expand_urls(str(tmp_path))
    read = [sum(1 for _ in read_samples(u, decode=False)) for u in urls]
    with caplog.at_level("WARNING", logger="shards.reader"):  # img2dataset cut off in its last shard: counted
        assert shard_sizes(urls) == read
    lines = [r.getMessage() for r in caplog.records if "counted by reading it" in r.getMessage()]
    assert len(lines) == 2 and "00000.tar" in lines[0] and "00000_stats.json" in lines[0]
    for stem, n in (("00000", 97), ("00001", 98)):
        (tmp_path / f"{stem}_stats.json").write_text(json.dumps({"count": 100, "successes": n}))
    assert count_samples(urls) == 97 + 98
    (tmp_path / "00001_stats.json").unlink()  # only the last shard lacks its stats
    assert shard_sizes(urls) == [97, read[1]]
    (tmp_path / "00001_stats.json").write_text(json.dumps({"count": 100, "successes": 98}))
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 100, "00001.tar": 100}))
    assert count_samples(urls) == 200  # exact counts (shards.validate) come first
    (tmp_path / "sizes.json").unlink()
    (tmp_path / "00001_stats.json").write_text("{}")
    with pytest.raises(UsageError, match="00001_stats.json: no img2dataset 'successes' count"):
        count_samples(urls)
