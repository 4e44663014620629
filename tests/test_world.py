"""The synthetic world: determinism, captions that match the labels, spec validation."""
from __future__ import annotations

import json
import tarfile

import pytest

from shards import world as W
from shards.generate import generate
from shards.reader import read_samples


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_same_seed_same_bytes_whatever_the_workers(tmp_path, tiny_spec):
    a = generate(tmp_path / "a", tiny_spec, 250, 100, seed=7, workers=1, progress=False)
    b = generate(tmp_path / "b", tiny_spec, 250, 100, seed=7, workers=2, progress=False)
    assert a == b == {"00000.tar": 100, "00001.tar": 100, "00002.tar": 50}
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert set(fa) == {"00000.tar", "00001.tar", "00002.tar", "00000.parquet", "00001.parquet",
                       "00002.parquet", "00000_stats.json", "00001_stats.json", "00002_stats.json",
                       "sizes.json", "world.json"}
    assert fa == fb
    c = generate(tmp_path / "c", tiny_spec, 250, 100, seed=8, workers=1, progress=False)
    assert c == a and _files(tmp_path / "c")["00000.tar"] != fa["00000.tar"]


def test_layout_is_img2dataset_and_open_clip_sizes(tmp_path, tiny_spec):
    generate(tmp_path, tiny_spec, 30, 20, seed=0, progress=False)
    with tarfile.open(tmp_path / "00000.tar") as tf:
        members = tf.getmembers()
    names = [m.name for m in members]
    assert names[:3] == ["000000000.jpg", "000000000.json", "000000000.txt"]
    # plain ustar members: no per-member PAX header (a float mtime would add one to each)
    assert all(m.pax_headers == {} and m.mtime == 0 for m in members)
    assert len(names) == 60
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 20, "00001.tar": 10}
    stats = json.loads((tmp_path / "00001_stats.json").read_text())
    assert stats["count"] == stats["successes"] == 10
    import pyarrow.parquet as pq
    rows = pq.read_table(tmp_path / "00001.parquet").to_pylist()
    assert [r["key"] for r in rows] == [f"00001{i:04d}" for i in range(10)]
    assert all(r["status"] == "success" and r["width"] == 32 for r in rows)


def test_captions_name_exactly_the_mentioned_attributes(tmp_path, tiny_spec):
    generate(tmp_path, tiny_spec, 400, 200, seed=3, progress=False)
    samples = list(read_samples(str(tmp_path), decode=True))
    assert len(samples) == 400
    mentioned_shape = 0
    for s in samples:
        attrs, said = s["json"]["attributes"], set(s["json"]["mentioned"])
        words = s["text"].split()
        assert s["text"].startswith("a photo of ")
        assert s["image"].size == (32, 32)
        assert f"{attrs['background']}" in words  # mention 1.0 in the tiny world
        shape_words = {w for w in words if w.rstrip("s") in W.SHAPES}
        if "shape" in said:
            mentioned_shape += 1
            plural = "count" not in said or attrs["count"] > 1
            assert shape_words == {attrs["shape"] + ("s" if plural else "")}
        else:
            assert not shape_words and "shape" in s["text"]
        if "count" in said:
            assert W.COUNT_WORDS[attrs["count"]] in words
        else:
            assert "some" in words and not set(W.COUNT_WORDS.values()) & set(words)
        if "position" not in said:
            assert "left" not in words and "right" not in words
    assert 150 < mentioned_shape < 250  # mention probability 0.5


def test_images_show_the_background_colour(tiny_spec):
    import numpy as np
    from PIL import ImageColor
    rng = np.random.default_rng(0)
    for colour in tiny_spec.attribute("background").values:
        scene = {"background": colour, "shape": "circle", "count": 1, "position": "left"}
        img = np.asarray(W.render(tiny_spec, scene, rng)).astype(int)
        corner = img[-2, -2]  # objects sit on the left: the bottom-right corner is background
        assert np.abs(corner - np.array(ImageColor.getrgb(colour))).max() <= tiny_spec.color_jitter + 2
        right_half = img[:, 20:]
        assert (np.abs(right_half - corner).sum(-1) < 40).mean() > 0.95  # nothing drawn there
        left_half = img[:, :14]
        assert (np.abs(left_half - corner).sum(-1) > 100).mean() > 0.03  # the object is there


@pytest.mark.parametrize("bad, message", [
    ({"attributes": {"texture": {"values": ["a", "b"]}}}, "attributes.texture: unknown attribute kind"),
    ({"attributes": {"shape": {"values": ["circle", "blob"]}}}, "'blob' is not a valid shape"),
    ({"attributes": {"count": {"values": [1]}}}, "need at least 2 distinct values"),
    ({"attributes": {"count": {"values": [1, 2], "mention": 2}}}, "attributes.count.mention"),
    ({"attributes": {"background": {"values": ["red", "blue"]}, "color": {"values": ["red", "white"]}}},
     "both background and object colours"),
    ({"attributes": {"size": {"values": ["small", "large"]}}, "colour": 3}, "unknown key(s) ['colour']"),
])
def test_spec_errors_name_the_key(bad, message):
    with pytest.raises(ValueError) as err:
        W.spec_from_dict(bad, source="w.yaml")
    assert message in str(err.value) and str(err.value).startswith("w.yaml")


def test_generate_refuses_a_folder_of_another_world_and_resumes(tmp_path, tiny_spec):
    from common.cli import UsageError
    generate(tmp_path, tiny_spec, 40, 20, seed=0, progress=False)
    with pytest.raises(UsageError, match="other parameters"):
        generate(tmp_path, tiny_spec, 40, 20, seed=1, progress=False)
    # a shard lost (or never finished) is rewritten identically; the others are kept
    before = _files(tmp_path)
    (tmp_path / "00001.tar").unlink()
    mtime0 = (tmp_path / "00000.tar").stat().st_mtime_ns
    generate(tmp_path, tiny_spec, 40, 20, seed=0, progress=False)
    assert _files(tmp_path) == before
    assert (tmp_path / "00000.tar").stat().st_mtime_ns == mtime0
