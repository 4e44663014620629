"""Compositional benchmarks in SugarCrepe's public format, from a local folder, several models side by side.

    python -m eval.sugarcrepe --data sugar_crepe/ --model mcl=runs/r/merged.pt --model base=runs/b/stage1/model \\
        --compare mcl base --out results/

SugarCrepe (Hsieh et al., NeurIPS 2023) on disk: one JSON file per category at the folder's top
(add_att.json, add_obj.json, replace_att.json, replace_obj.json, replace_rel.json, swap_att.json,
swap_obj.json), each {"<id>": {"filename", "caption", "negative_caption"}}, and the images in one
folder (COCO val2017 for the real benchmark), by default DATA/val2017 (`--images`). Every
top-level .json is a category, so a folder may hold only some of them, or others in the same
format (the synthetic world writes one per attribute, a caption with that attribute replaced).
Nothing is downloaded: on a cluster node nothing can be (CLIP_benchmark's SugarCrepe loader
downloads what is missing).

A sample is right when the model scores its image higher with the caption than with the negative
caption (cosine of normalised features; a tie is wrong). Per category: the share right with its
bootstrap 95% interval, and the average over categories (eval.stats); with --compare, the paired
differences and exact McNemar tests. An image that cannot be read is counted and skipped, for
every model alike. A model is NAME=SPEC (eval.encoders): a merged artifact, a stage folder, a
training checkpoint or ARCH:TAG.

Writes OUT/sugarcrepe_samples.csv (per sample and model), OUT/sugarcrepe_summary.json and
OUT/sugarcrepe.png (per category and model, with the intervals and the chance line at 50), each
atomically.
"""
from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from common.cli import ArgumentParser, UsageError, run_main, setup_logging
from common.io import write_csv, write_json
from eval import stats as S
from eval.encoders import Encoder, add_model_options, check_compare, load_encoder

log = logging.getLogger("eval.sugarcrepe")
SUMMARY_NAME = "sugarcrepe_summary.json"  # what launch checks to call the evaluation done
SAMPLES_NAME = "sugarcrepe_samples.csv"
IMAGES_DIR = "val2017"
CHANCE = 50.0
FIELDS = ("filename", "caption", "negative_caption")


def read_sets(data: str | Path, images: str | Path | None = None) -> OrderedDict:
    """{category: [(id, image path, caption, negative caption), ...]} of every top-level .json,
    in name order; a file not in the format, or a missing image, is a UsageError naming it."""
    data = Path(data)
    if not data.is_dir():
        raise UsageError(f"{data}: not a folder (a SugarCrepe folder holds <category>.json and {IMAGES_DIR}/)")
    folder = Path(images) if images else data / IMAGES_DIR
    files = sorted(data.glob("*.json"))
    if not files:
        raise UsageError(f"{data}: no <category>.json (not a SugarCrepe folder)")
    if not folder.is_dir():
        raise UsageError(f"{folder}: missing image folder (give --images)")
    sets: OrderedDict = OrderedDict()
    for path in files:
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: not JSON ({exc})") from None
        if not isinstance(records, dict) or not records:
            raise UsageError(f"{path}: expected an object {{id: {{{', '.join(FIELDS)}}}}} with at least one entry")
        items = []
        for key, rec in records.items():
            if not isinstance(rec, dict) or not all(isinstance(rec.get(f), str) and rec.get(f) for f in FIELDS):
                raise UsageError(f"{path}: entry {key!r} needs the string fields {', '.join(FIELDS)}")
            image = folder / rec["filename"]
            if not image.is_file():
                raise UsageError(f"{image}: missing image (entry {key!r} of {path.name})")
            items.append((str(key), image, rec["caption"], rec["negative_caption"]))
        sets[path.stem] = items
    return sets


def _load(path: Path):
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a sample to skip
        log.warning("%s: cannot read image, skipped (%s)", path, exc)
        return None


def evaluate(sets: OrderedDict, encoders: list[Encoder], batch_size: int = 64) -> dict:
    """{"samples": [{category, id, model: margin, ...}], "skipped": [...], "outcomes": {model:
    {category: [0/1, ...]}}}; margin = cos(image, caption) - cos(image, negative caption)."""
    from tqdm import tqdm

    items = [(cat, *item) for cat, group in sets.items() for item in group]
    rows, skipped = [], []
    with tqdm(total=len(items), desc="sugarcrepe", unit="sample", mininterval=10) as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            bar.update(len(chunk))
            images = [_load(path) for _, _, path, _, _ in chunk]
            skipped += [str(path) for (_, _, path, _, _), im in zip(chunk, images) if im is None]
            chunk = [c for c, im in zip(chunk, images) if im is not None]
            images = [im for im in images if im is not None]
            if chunk:
                margins = {}
                for enc in encoders:
                    fi = enc.images(images)
                    ft = enc.texts([c[3] for c in chunk] + [c[4] for c in chunk])
                    pos, neg = ft[:len(chunk)], ft[len(chunk):]
                    margins[enc.name] = ((fi * pos).sum(-1) - (fi * neg).sum(-1)).tolist()
                for j, (cat, key, *_rest) in enumerate(chunk):
                    rows.append({"category": cat, "id": key, **{n: m[j] for n, m in margins.items()}})
    if not rows:
        raise UsageError("no SugarCrepe sample could be read")
    outcomes = {enc.name: OrderedDict() for enc in encoders}
    for r in rows:
        for enc in encoders:
            outcomes[enc.name].setdefault(r["category"], []).append(int(r[enc.name] > 0))
    if skipped:
        log.warning("%d image(s) could not be read and were skipped for every model", len(skipped))
    return {"samples": rows, "skipped": skipped, "outcomes": outcomes}


def write_outputs(result: dict, out: str | Path, compare: Sequence[str] = ()) -> dict:
    """OUT/sugarcrepe_samples.csv, OUT/sugarcrepe.png, then OUT/sugarcrepe_summary.json:
    {"models": {name: {category: {score, low, high}, ..., "average"}}, "comparisons", "skipped", ...}."""
    from eval.plots import plot_intervals

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(result["outcomes"])
    summary = S.outcome_stats(result["outcomes"], compare)
    summary["samples"] = {cat: len(v) for cat, v in next(iter(result["outcomes"].values())).items()}
    summary["skipped"] = result["skipped"]
    write_csv(out / SAMPLES_NAME, ["model", "category", "id", "margin", "correct"],
              ([name, r["category"], r["id"], round(r[name], 6), int(r[name] > 0)]
               for name in names for r in result["samples"]))
    plot_intervals(summary["models"], out / "sugarcrepe.png", "SugarCrepe-format benchmark per category",
                   "caption preferred to its negative (%)", CHANCE)
    write_json(out / SUMMARY_NAME, summary, sort_keys=False)  # last: it marks the evaluation done
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m eval.sugarcrepe", description=__doc__)
    p.add_argument("--data", required=True, help="SugarCrepe folder (<category>.json files)")
    p.add_argument("--images", help=f"the images' folder (default: DATA/{IMAGES_DIR})")
    add_model_options(p)
    p.add_argument("--out", required=True, help="folder for the CSV, JSON and PNG")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    setup_logging()
    check_compare(args)
    sets = read_sets(args.data, args.images)  # bad data fails before models load
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoders = [load_encoder(m, device) for m in args.model]
    summary = write_outputs(evaluate(sets, encoders, args.batch_size), args.out, args.compare)
    print(S.text_table(summary, "category (% right)"))
    return 0


if __name__ == "__main__":
    run_main(main, "python -m eval.sugarcrepe")
