"""Write a held-out compositional benchmark of the synthetic world in SugarCrepe's public format.

    python -m shards.sugarcrepe_writer OUT --world configs/worlds/default.yaml --samples 100

SugarCrepe's layout, so its own scripts, CLIP_benchmark's loader and eval.sugarcrepe read it:

    OUT/replace_<attribute>.json   {"<id>": {"filename", "caption", "negative_caption"}}, one per attribute
    OUT/val2017/<id>.jpg           the images (the folder name of SugarCrepe's COCO images)

Each sample is a new scene (a seed of its own, unlike the training shards'), its caption the
full description of its image ("a photo of two stars pointing up on the left on a red
background"), its negative caption the same with that file's attribute replaced by another
of its values ("... pointing down ..."): SugarCrepe's replace-attribute hard negative, where
only that attribute tells the captions apart. `--samples` per attribute. Beside the sets,
OUT/world/params.json holds the parameters and OUT/world/attributes.json each image's scene
(not at the top: every top-level .json is a category). Built under a temporary name, renamed
when complete; a complete folder with the same parameters is kept.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from common.cli import ArgumentParser, UsageError, run_main, setup_logging
from common.io import atomic_folder, write_json
from shards import world as W

log = logging.getLogger("shards.sugarcrepe_writer")
IMAGES_DIR = "val2017"
PARAMS = Path("world") / "params.json"


def samples(spec: W.WorldSpec, per_attribute: int, seed: int):
    """Yield (attribute, scene, negative scene, render seed) for every sample."""
    for index, attr in enumerate(spec.attributes):
        if len(attr.values) < 2:
            continue
        rng = np.random.default_rng([seed, index])
        for _ in range(per_attribute):
            scene = W.sample_scene(spec, rng)
            others = [v for v in attr.values if v != scene[attr.kind]]
            yield attr.kind, scene, {**scene, attr.kind: others[rng.integers(len(others))]}, int(rng.integers(2 ** 62))


def write_sets(out: str | Path, spec: W.WorldSpec, per_attribute: int = 100, seed: int = 2) -> Path:
    """Write the folder (skipped when already complete with the same parameters)."""
    if per_attribute < 1:
        raise UsageError("--samples must be >= 1")
    out = Path(out)
    params = {"world": spec.to_dict(), "samples_per_attribute": per_attribute, "seed": seed}
    if out.exists():
        if (out / PARAMS).is_file() and json.loads((out / PARAMS).read_text()) == params:
            log.info("%s: SugarCrepe-format set already written", out)
            return out
        raise UsageError(f"{out}: exists and is not this set (other parameters or incomplete); "
                         "choose another folder or remove it")
    with atomic_folder(out) as tmp:
        (tmp / IMAGES_DIR).mkdir()
        sets: dict[str, dict] = {}
        scenes = {}
        for n, (kind, scene, negative, render_seed) in enumerate(samples(spec, per_attribute, seed)):
            name = f"{n:06d}.jpg"
            img = W.render(spec, scene, np.random.default_rng(render_seed))
            (tmp / IMAGES_DIR / name).write_bytes(W.encode_jpeg(img, spec.jpeg_quality))
            records = sets.setdefault(f"replace_{kind}", {})
            records[str(len(records))] = {"filename": name, "caption": W.caption(spec, scene),
                                          "negative_caption": W.caption(spec, negative)}
            scenes[name] = scene
        for category, records in sets.items():
            write_json(tmp / f"{category}.json", records, sort_keys=False)
        (tmp / PARAMS.parent).mkdir()
        write_json(tmp / PARAMS.parent / "attributes.json", scenes)
        write_json(tmp / PARAMS, params)
    log.info("wrote %d samples (%d categories) to %s", len(scenes), len(sets), out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m shards.sugarcrepe_writer", description=__doc__)
    p.add_argument("out", help="output folder (must not exist, or hold this same set)")
    W.add_world_argument(p)
    p.add_argument("--samples", type=int, default=100, help="samples per attribute")
    p.add_argument("--seed", type=int, default=2, help="random seed (use one unlike the training shards')")
    args = p.parse_args(argv)
    setup_logging()
    write_sets(args.out, W.spec_from_args(args), args.samples, args.seed)
    return 0


if __name__ == "__main__":
    run_main(main, "python -m shards.sugarcrepe_writer")
