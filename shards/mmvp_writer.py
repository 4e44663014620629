"""Write an MMVP-VLM-format benchmark of the synthetic world.

    python -m shards.mmvp_writer OUT --world configs/worlds/default.yaml --pairs 15

The folder is laid out exactly like the public MMVP_VLM data set, so any MMVP-VLM
evaluation script reads it unchanged:

    OUT/Questions.csv                      header "Question ID,Type,Statement"
    OUT/MLLM_VLM Images/<Type>/<qid>.jpg   one folder per visual pattern (= Type)

One pattern per world attribute, in the spec's order; `--pairs` pairs per pattern, two
rows per pair, question ids 1, 2, 3, ... so that the odd id is the pair's first image.
The two images of a pair share every attribute but the pattern's own (and share their
layout jitter); each statement is the full description of its image. Beside it,
`attributes.json` holds each image's attributes and `world.json` the parameters.
The folder is built under a temporary name and renamed when complete.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from shards import world as W
from common.cli import ArgumentParser, UsageError, run_main, setup_logging
from common.io import atomic_folder, write_json

log = logging.getLogger("shards.mmvp_writer")
IMAGES_DIR = "MLLM_VLM Images"
CSV_HEADER = ("Question ID", "Type", "Statement")


def benchmark_pairs(spec: W.WorldSpec, pairs: int, seed: int):
    """Yield (pattern, attribute, scene_a, scene_b, render_seed) for every pair."""
    for index, attr in enumerate(spec.attributes):
        rng = np.random.default_rng([seed, index])
        for _ in range(pairs):
            scene_a = W.sample_scene(spec, rng)
            others = [v for v in attr.values if v != scene_a[attr.kind]]
            scene_b = {**scene_a, attr.kind: others[rng.integers(len(others))]}
            yield attr.pattern, attr.kind, scene_a, scene_b, int(rng.integers(2 ** 62))


def write_benchmark(out: str | Path, spec: W.WorldSpec, pairs: int = 15, seed: int = 1) -> Path:
    """Write the benchmark folder (skipped when already complete with the same parameters)."""
    if pairs < 1:
        raise UsageError("--pairs must be >= 1")
    out = Path(out)
    params = {"world": spec.to_dict(), "pairs_per_pattern": pairs, "seed": seed}
    if out.exists():
        record = out / "world.json"
        if (out / "Questions.csv").exists() and record.exists() and json.loads(record.read_text()) == params:
            log.info("%s: benchmark already written", out)
            return out
        raise UsageError(f"{out}: exists and is not this benchmark (other parameters or incomplete); "
                         "choose another folder or remove it")
    with atomic_folder(out) as tmp:
        rows, labels = [], {}
        qid = 0
        for pattern, _kind, scene_a, scene_b, render_seed in benchmark_pairs(spec, pairs, seed):
            folder = tmp / IMAGES_DIR / pattern
            folder.mkdir(parents=True, exist_ok=True)
            for scene in (scene_a, scene_b):
                qid += 1
                img = W.render(spec, scene, np.random.default_rng(render_seed))
                (folder / f"{qid}.jpg").write_bytes(W.encode_jpeg(img, spec.jpeg_quality))
                rows.append((qid, pattern, W.describe(spec, scene)))
                labels[str(qid)] = scene
        with open(tmp / "Questions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_HEADER)
            writer.writerows(rows)
        write_json(tmp / "attributes.json", labels)
        write_json(tmp / "world.json", params)
    log.info("wrote %d pairs (%d patterns x %d) to %s", qid // 2, len(spec.attributes), pairs, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m shards.mmvp_writer", description=__doc__)
    p.add_argument("out", help="output folder (must not exist, or hold this same benchmark)")
    W.add_world_argument(p)
    p.add_argument("--pairs", type=int, default=15, help="pairs per pattern (15 like MMVP-VLM)")
    p.add_argument("--seed", type=int, default=1, help="random seed (use one unlike the training shards')")
    args = p.parse_args(argv)
    setup_logging()
    spec = W.spec_from_args(args)
    write_benchmark(args.out, spec, args.pairs, args.seed)
    return 0


if __name__ == "__main__":
    run_main(main, "python -m shards.mmvp_writer")
