"""Embedding throughput against training throughput of the same model on the same cores.

    .venv/bin/python bench/embed_throughput.py [--samples 10000] [--repeats 2] [--data SHARDS]

Embedding is one forward pass of one tower, so it should run several times faster than a
training step (forward of both towers, backward, optimizer). Same shards (the default
synthetic world), model (`mcl-tiny-vit`, a random init saved as a stage), DataLoader workers
(1) and threads, one after the other, alternating, `--repeats` times; each in a fresh
process. Embed: `pipeline.embed.embed` over all shards after a one-shard warm-up (samples
per second of the call). Train: `pipeline.train`, steady-state samples/s from its
metrics.jsonl. What bounds embedding: the same shards read, decoded and transformed without
the model (the loader alone, images only, as embed reads them for the image tower), and the image tower alone on one ready batch.
Prints samples/s of each and the ratio embed / train (target >= 3).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.world import default_world_shards  # noqa: E402

EMBED = """
import sys, time, shutil
sys.path.insert(0, {repo!r})
import torch
from pathlib import Path
from pipeline.embed import ShardBatches, embed
from pipeline import models
from shards.reader import expand_urls
model_dir, data, out, batch = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
urls = expand_urls(data)
embed(model_dir, urls[:1], out / "warm", batch_size=batch, workers=1, progress=False)
t = time.perf_counter()
files = embed(model_dir, urls, out / "all", batch_size=batch, workers=1, progress=False)
total = time.perf_counter() - t
import numpy as np
n = sum(len(np.load(f)["keys"]) for f in files)
loaded = models.load(model_dir)
loader = torch.utils.data.DataLoader(ShardBatches(urls, loaded.preprocess, None, batch),
                                     batch_size=None, num_workers=1)
t = time.perf_counter()
first, m = None, 0
for b in loader:
    first = first if first is not None or not len(b["keys"]) else b
    m += len(b["keys"])
load = time.perf_counter() - t
with torch.no_grad():
    loaded.model.encode_image(first["images"])
    t = time.perf_counter()
    for _ in range(5):
        loaded.model.encode_image(first["images"])
    fwd = (time.perf_counter() - t) / 5
print(n / total, m / load, len(first["keys"]) / fwd)
"""


def run_embed(model_dir: Path, data: Path, out: Path, batch: int) -> tuple[float, float, float]:
    r = subprocess.run([sys.executable, "-c", EMBED.format(repo=str(REPO)), str(model_dir), str(data), str(out),
                        str(batch)], capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"embed failed:\n{r.stderr[-3000:]}")
    embed_rate, loader_rate, tower_rate = map(float, r.stdout.split()[-3:])
    return embed_rate, loader_rate, tower_rate


def run_train(data: Path, out: Path, steps: int, batch: int, skip: int) -> float:
    args = [f"data={data}", f"out={out}", f"steps={steps}", f"batch_size={batch}", "workers=1",
            "model=mcl-tiny-vit", "lr=5e-4", "warmup=10", f"save_every={steps}", "log_every=20"]
    r = subprocess.run([sys.executable, "-m", "pipeline.train", *args], capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"pipeline.train failed:\n{r.stderr[-3000:]}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return (len(recs) - skip) * batch / (recs[-1]["time"] - recs[skip - 1]["time"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=10000, help="of the generated world (ignored with --data)")
    p.add_argument("--batch-size", type=int, default=128, help="the same for embedding and training")
    p.add_argument("--steps", type=int, default=60, help="training steps per measurement")
    p.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the training rate")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--data", help="shards of the default world (generated when absent)")
    args = p.parse_args()
    import torch

    from pipeline import models

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = default_world_shards(args.data, tmp, args.samples)
        torch.manual_seed(0)
        model, *_ = models.create("mcl-tiny-vit")
        model_dir = models.save_model(model, "mcl-tiny-vit", models.model_config("mcl-tiny-vit"), tmp / "stage")
        rates = {"embed": [], "loader_only": [], "image_tower_only": [], "train": []}
        for i in range(args.repeats):
            e, loader, tower = run_embed(model_dir, data, tmp / f"emb{i}", args.batch_size)
            rates["embed"].append(e)
            rates["loader_only"].append(loader)
            rates["image_tower_only"].append(tower)
            rates["train"].append(run_train(data, tmp / f"train{i}", args.steps, args.batch_size, args.skip))
            print(f"repeat {i}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()), flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"samples/s (median of {args.repeats}, batch {args.batch_size}, 1 DataLoader worker, threads "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}):")
    for k, v in med.items():
        print(f"  {k:17s} {v:8.0f}")
    print(f"ratio embed / train = {med['embed'] / med['train']:.2f}  (target >= 3)")


if __name__ == "__main__":
    main()
