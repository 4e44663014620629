"""Zero-shot evaluation of several models: one shared pass per data set against one pass per model.

    .venv/bin/python bench/zeroshot_pass.py [--models 3] [--samples 1000] [--image-size 32 224] [--workers 1]

eval.zeroshot evaluates models that preprocess alike on one DataLoader pass per data set
(eval.fanout: CLIP_benchmark's metric functions each run in a thread on a view of the pass);
before, each model made its own pass and decoded every image again. Both run here side by
side on the same sets: held-out samples of the default world written as CLIP_benchmark
webdataset sets (the shape classification set and the captions retrieval set), --models
freshly initialised mcl-tiny-vit models (the scores do not matter; the two ways must give
the same ones, which is checked), batch 64, --workers DataLoader workers, --threads torch
threads (default: torch's own). Each image size
is a world of that size: 32 px is the demo (a model forward costs more than decoding an
image), 224 px is the regime of a GPU, where decoding and resizing a web-sized image cost
more than the model. Prints the times and the ratio per image size. Target: >= 1.5x at
224 px with 3 models.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval import zeroshot as Z  # noqa: E402
from eval.encoders import Encoder  # noqa: E402
from pipeline import models  # noqa: E402
from shards import world as W  # noqa: E402
from shards.generate import generate  # noqa: E402
from shards.zeroshot_writer import write_sets  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def encoders(n: int) -> list[Encoder]:
    out = []
    for i in range(n):
        torch.manual_seed(i)
        model, _, pre_val, tokenizer = models.create("mcl-tiny-vit")
        out.append(Encoder(f"m{i}", model, pre_val, tokenizer))
    return out


def timed(fn):
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--image-size", type=int, nargs="+", default=[32, 224])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
    args = p.parse_args()
    logging.disable(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    encs = encoders(args.models)
    base = W.load_spec(str(REPO / "configs" / "worlds" / "default.yaml"))
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.image_size:
            spec = dataclasses.replace(base, image_size=size)
            generate(Path(tmp) / f"held_out{size}", spec, args.samples, args.samples, seed=5, progress=False)
            sets = write_sets(str(Path(tmp) / f"held_out{size}"), Path(tmp) / f"sets{size}")
            benches = [Z.Benchmark("wds/shape", str(sets["shape"])), Z.Benchmark("wds/captions", str(sets["captions"]))]
            shared_t, separate_t = [], []
            for _ in range(args.repeats):  # alternating, the best of each
                t, shared = timed(lambda: Z.evaluate(benches, encs, 64, args.workers))
                shared_t.append(t)
                t, separate = timed(lambda: {e.name: Z.evaluate(benches, [e], 64, args.workers)[e.name]
                                             for e in encs})
                separate_t.append(t)
                assert shared == separate, (shared, separate)
            a, b = min(shared_t), min(separate_t)
            print(f"{size} px, {args.samples} images x 2 sets, {args.models} models: one pass per model "
                  f"{b:.1f} s, one shared pass {a:.1f} s: {b / a:.2f}x", flush=True)


if __name__ == "__main__":
    main()
