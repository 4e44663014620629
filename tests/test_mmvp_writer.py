"""The MMVP-VLM-format benchmark: the public layout, and pairs that differ in one attribute."""
from __future__ import annotations

import csv
import json

import pytest

from common.cli import UsageError
from shards.mmvp_writer import write_benchmark


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_spec):
    return write_benchmark(tmp_path_factory.mktemp("b") / "mmvp", tiny_spec, pairs=6, seed=1)


def test_layout_matches_public_mmvp_vlm(bench, tiny_spec):
    with open(bench / "Questions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Question ID", "Type", "Statement"]
    rows = rows[1:]
    patterns = [a.pattern for a in tiny_spec.attributes]
    assert len(rows) == len(patterns) * 6 * 2
    assert [int(r[0]) for r in rows] == list(range(1, len(rows) + 1))
    # rows grouped by pattern in the spec's order, like the official script expects
    assert [rows[i * 12][1] for i in range(len(patterns))] == patterns
    assert all(r[1] == rows[(i // 12) * 12][1] for i, r in enumerate(rows))
    folders = sorted(p.name for p in (bench / "MLLM_VLM Images").iterdir())
    assert folders == sorted(patterns)
    for qid, typ, statement in rows:
        assert (bench / "MLLM_VLM Images" / typ / f"{qid}.jpg").is_file()
        assert statement and not statement.startswith("a photo of")  # the evaluator adds it


def test_each_pair_differs_in_exactly_its_pattern_attribute(bench, tiny_spec):
    labels = json.loads((bench / "attributes.json").read_text())
    with open(bench / "Questions.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    kind_of = {a.pattern: a.kind for a in tiny_spec.attributes}
    for first, second in zip(rows[0::2], rows[1::2]):
        assert int(first[0]) % 2 == 1 and int(second[0]) == int(first[0]) + 1
        a, b = labels[first[0]], labels[second[0]]
        differing = [k for k in a if a[k] != b[k]]
        assert differing == [kind_of[first[1]]]
        assert first[2] != second[2]


def test_rerun_is_a_no_op_and_other_parameters_are_refused(bench, tiny_spec):
    mtime = (bench / "Questions.csv").stat().st_mtime_ns
    write_benchmark(bench, tiny_spec, pairs=6, seed=1)
    assert (bench / "Questions.csv").stat().st_mtime_ns == mtime
    with pytest.raises(UsageError, match="not this benchmark"):
        write_benchmark(bench, tiny_spec, pairs=7, seed=1)
