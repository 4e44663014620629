"""The per-item outcome files the evaluations write, read back: what eval.report pools over seeds.

Each evaluation writes one CSV row per model and item with a `correct` column (1 or 0):
eval.mmvp's mmvp_pairs.csv (per pair, grouped by pattern), eval.sugarcrepe's
sugarcrepe_samples.csv (per sample, by category), eval.zeroshot's zeroshot_samples.csv (per
image or caption, by data set) and eval.probes's probes_samples.csv (per test sample, by
attribute, for each probe). `read` gives {model: {group: [0/1, ...]}} in file order; `pack` and
`unpack` keep such lists in a JSON record as strings of 0 and 1.
"""
from __future__ import annotations

import csv
from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Sequence

# evaluation -> (its outcome file, the column that groups items, the rows it keeps)
SOURCES = {
    "mmvp": ("mmvp_pairs.csv", "type", {}),
    "sugarcrepe": ("sugarcrepe_samples.csv", "category", {}),
    "zeroshot": ("zeroshot_samples.csv", "dataset", {}),
    "probe": ("probes_samples.csv", "attribute", {"probe": "linear"}),
    "probe_knn": ("probes_samples.csv", "attribute", {"probe": "knn"}),
}


def read(path: str | Path, group: str, where: Mapping[str, str] | None = None) -> dict:
    """{model: {group: [0/1, ...]}} of the rows whose columns match `where`."""
    outcomes: dict = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if all(row.get(k) == v for k, v in (where or {}).items()):
                outcomes.setdefault(row["model"], OrderedDict()).setdefault(row[group], []).append(int(row["correct"]))
    return outcomes


def read_eval_dir(folder: str | Path) -> dict:
    """{evaluation: {model: {group: [0/1, ...]}}} of the outcome files present in an eval folder."""
    out = {}
    for kind, (name, group, where) in SOURCES.items():
        if (Path(folder) / name).is_file():
            out[kind] = read(Path(folder) / name, group, where)
    return out


def pack(values: Sequence[int]) -> str:
    return "".join("1" if v else "0" for v in values)


def unpack(bits: str) -> list[int]:
    return [1 if c == "1" else 0 for c in bits]
