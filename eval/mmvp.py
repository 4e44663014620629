"""Zero-shot MMVP-VLM evaluation of CLIP models, several side by side.

    python -m eval.mmvp --data MMVP_VLM/ --model mcl=runs/r/merged.pt --model base=runs/b/stage1/model \\
        --model openai=ViT-L-14:openai --out results/

Reads the public MMVP_VLM layout (`Questions.csv`: question id, type, statement, with a
header row; images at `MLLM_VLM Images/<Type>/<qid>.jpg`) and follows the public
protocol (MMVP's scripts/evaluate_vlm.py): each statement is prompted as "a photo of " +
statement; for each statement a softmax over its pair's two images (logits 100 x cosine);
it picks image 1 when that probability exceeds 0.5; ground truth by question-id parity
(odd = image 1); a pair counts only if both statements pick their own image. Pairs are
grouped by their Type (the official script counts 15 rows per pattern in file order,
which is the same on the real file); per-pattern percentages and their average.

A model is NAME=SPEC (or SPEC; see eval.encoders): a merged artifact (`.pt` from
pipeline.merge), a stage model folder, a training checkpoint (`checkpoints/step_N.pt`), or
an open_clip architecture with a pretrained tag or file (`ARCH:TAG`).
Beside the scores (eval.stats): each pattern's and the average's bootstrap 95% interval
(pairs resampled within each pattern); with `--compare A B [C ...]`, A's paired difference with
each other model (its interval from the same pairs resampled for both) and an exact McNemar test
on the pairs where they disagree, per pattern and overall. Chance is 25%: a pair counts only
when both of its statements pick their image.

Writes OUT/mmvp_pairs.csv (per pair and model), OUT/mmvp_stats.json (the intervals and
comparisons), OUT/mmvp_patterns.png (scores, intervals, the chance line) and
OUT/mmvp_summary.json (the scores; written last), each atomically.
"""
from __future__ import annotations

import csv
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

log = logging.getLogger("eval.mmvp")
SUMMARY_NAME = "mmvp_summary.json"  # what launch checks to call the evaluation done
STATS_NAME = "mmvp_stats.json"
PAIRS_NAME = "mmvp_pairs.csv"
IMAGES_DIR = "MLLM_VLM Images"


# --- the benchmark ---------------------------------------------------------------------------


def read_questions(data: Path) -> OrderedDict:
    """{type: [(qid1, statement1, qid2, statement2), ...]} in file order; errors name the file."""
    path = data / "Questions.csv"
    if not path.is_file():
        raise UsageError(f"{path}: missing (not an MMVP-VLM folder)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if len(rows) < 3:
        raise UsageError(f"{path}: needs a header row and at least one pair")
    by_type: OrderedDict = OrderedDict()
    for line, row in enumerate(rows[1:], start=2):
        if len(row) < 3:
            raise UsageError(f"{path}:{line}: expected 3 columns (question id, type, statement), got {len(row)}")
        try:
            qid = int(row[0])
        except ValueError:
            raise UsageError(f"{path}:{line}: question id {row[0]!r} is not an integer") from None
        by_type.setdefault(row[1].strip(), []).append((qid, row[2].strip(), line))
    pairs: OrderedDict = OrderedDict()
    for typ, items in by_type.items():
        if len(items) % 2:
            raise UsageError(f"{path}: type {typ!r} has an odd number of rows ({len(items)}); rows come in pairs")
        pairs[typ] = []
        for (q1, s1, l1), (q2, s2, _) in zip(items[0::2], items[1::2]):
            if q1 % 2 != 1 or q2 != q1 + 1:
                raise UsageError(f"{path}:{l1}: pair ({q1}, {q2}) is not (odd id, next id)")
            pairs[typ].append((q1, s1, q2, s2))
    return pairs


def image_path(data: Path, typ: str, qid: int) -> Path:
    return data / IMAGES_DIR / typ / f"{qid}.jpg"


def check_images(data: Path, pairs: OrderedDict) -> None:
    for typ, items in pairs.items():
        folder = data / IMAGES_DIR / typ
        if not folder.is_dir():
            raise UsageError(f"{folder}: missing image folder for type {typ!r}")
        for q1, _, q2, _ in items:
            for q in (q1, q2):
                if not image_path(data, typ, q).is_file():
                    raise UsageError(f"{image_path(data, typ, q)}: missing image")


# --- scoring ---------------------------------------------------------------------------------


def score_pairs(image_feats: dict, text_feats: dict, pairs: OrderedDict) -> list[dict]:
    """The public protocol on precomputed features; {qid: feature} and {qid: feature}."""
    rows = []
    for typ, items in pairs.items():
        for q1, _, q2, _ in items:
            imgs = torch.stack([image_feats[q1], image_feats[q2]])
            p1 = (100.0 * text_feats[q1] @ imgs.T).softmax(-1)  # statement 1 over the two images
            p2 = (100.0 * text_feats[q2] @ imgs.T).softmax(-1)
            pred1 = "img1" if p1[0] > 0.5 else "img2"
            pred2 = "img1" if p2[0] > 0.5 else "img2"
            gt1 = "img1" if q1 % 2 == 1 else "img2"
            gt2 = "img1" if q2 % 2 == 1 else "img2"
            rows.append({"type": typ, "qid1": q1, "qid2": q2, "pred1": pred1, "pred2": pred2, "gt1": gt1,
                         "gt2": gt2, "q1score": round(float(p1[0]), 6), "q2score": round(float(p2[0]), 6),
                         "correct": pred1 == gt1 and pred2 == gt2})
    return rows


def summarize(rows: list[dict]) -> OrderedDict:
    out: OrderedDict = OrderedDict()
    for r in rows:
        n, c = out.get(r["type"], (0, 0))
        out[r["type"]] = (n + 1, c + int(r["correct"]))
    pct = OrderedDict((t, round(100.0 * c / n, 2)) for t, (n, c) in out.items())
    pct["average"] = round(sum(pct.values()) / len(pct), 2) if pct else 0.0
    return pct


def evaluate(data: str | Path, encoders: list[Encoder], batch_size: int = 64) -> dict:
    """{model name: {"patterns": {type: pct, ..., "average"}, "pairs": [...]}}."""
    data = Path(data)
    pairs = read_questions(data)
    check_images(data, pairs)
    qids = [(typ, q, s) for typ, items in pairs.items() for q1, s1, q2, s2 in items for q, s in ((q1, s1), (q2, s2))]
    images = {}
    for typ, q, _ in qids:
        try:
            with Image.open(image_path(data, typ, q)) as im:
                images[q] = im.convert("RGB")
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"{image_path(data, typ, q)}: cannot read image ({exc})") from exc
    results = {}
    for enc in encoders:
        feats_i, feats_t = {}, {}
        for i in range(0, len(qids), batch_size):
            chunk = qids[i:i + batch_size]
            fi = enc.images([images[q] for _, q, _ in chunk])
            ft = enc.texts(["a photo of " + s for _, _, s in chunk])
            for j, (_, q, _) in enumerate(chunk):
                feats_i[q], feats_t[q] = fi[j], ft[j]
        rows = score_pairs(feats_i, feats_t, pairs)
        results[enc.name] = {"patterns": summarize(rows), "pairs": rows}
        log.info("%s: %s", enc.name, ", ".join(f"{k} {v:.1f}" for k, v in results[enc.name]["patterns"].items()))
    return results


def pair_outcomes(rows: list[dict]) -> OrderedDict:
    """{pattern: [1 if the pair is right else 0, ...]} in benchmark order."""
    out: OrderedDict = OrderedDict()
    for r in rows:
        out.setdefault(r["type"], []).append(int(r["correct"]))
    return out


def write_outputs(results: dict, out: str | Path, compare: Sequence[str] = ()) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / PAIRS_NAME,
              ["model", "type", "qid1", "qid2", "pred1", "pred2", "gt1", "gt2", "q1score", "q2score", "correct"],
              ([name, p["type"], p["qid1"], p["qid2"], p["pred1"], p["pred2"], p["gt1"], p["gt2"],
                p["q1score"], p["q2score"], int(p["correct"])] for name, r in results.items() for p in r["pairs"]))
    stats = S.outcome_stats({name: pair_outcomes(r["pairs"]) for name, r in results.items()}, compare)
    write_json(out / STATS_NAME, {**stats, "chance": S.CHANCE_MMVP}, sort_keys=False)
    from eval.plots import plot_intervals

    plot_intervals(stats["models"], out / "mmvp_patterns.png", "MMVP-VLM per pattern", "pairs correct (%)",
                   S.CHANCE_MMVP)
    summary = {name: r["patterns"] for name, r in results.items()}
    write_json(out / SUMMARY_NAME, summary, sort_keys=False)  # patterns in benchmark order; last: done
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m eval.mmvp", description=__doc__)
    p.add_argument("--data", required=True, help="MMVP_VLM folder (Questions.csv + 'MLLM_VLM Images/')")
    add_model_options(p)
    p.add_argument("--out", required=True, help="folder for the CSV, JSON and PNG")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    setup_logging()
    check_compare(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_images(Path(args.data), read_questions(Path(args.data)))  # bad data fails before models load
    encoders = [load_encoder(m, device) for m in args.model]
    write_outputs(evaluate(args.data, encoders, args.batch_size), args.out, args.compare)
    print(S.text_table(json.loads((Path(args.out) / STATS_NAME).read_text()), "pattern (% pairs right)"))
    return 0


if __name__ == "__main__":
    run_main(main, "python -m eval.mmvp")
