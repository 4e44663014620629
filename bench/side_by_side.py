"""The demo's `parallel`: training runs side by side with one thread each, against one after
another with two threads each (the demo's previous setting), on the same 2 cores.

    .venv/bin/python bench/side_by_side.py [--runs 2] [--steps 60] [--data DIR]

Each arm trains `--runs` stages of the demo's model and batch (mcl-tiny-vit, 128, one
DataLoader worker) on the default world's shards: `sequential` runs them one after the other
with threads=2, `side_by_side` starts them together with threads=1. The arms alternate,
twice. Prints the wall time of each arm (from the first start to the last end, process
start-up included) and the ratio sequential / side_by_side: > 1 means side by side finishes
the same training sooner. The losses of both arms are equal (the thread count does not
change the result) and are checked.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.world import default_world_shards  # noqa: E402


def start(data: Path, out: Path, steps: int, threads: int, seed: int) -> subprocess.Popen:
    args = [f"data={data}", f"out={out}", f"steps={steps}", "batch_size=128", "workers=1", f"threads={threads}",
            "model=mcl-tiny-vit", "lr=1e-3", "warmup=5", f"save_every={steps}", f"log_every={steps}",
            "caption_dedup=true", f"seed={seed}"]
    return subprocess.Popen([sys.executable, "-m", "pipeline.train", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"pipeline.train failed:\n{err[-3000:]}")


def final_loss(out: Path) -> float:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["loss"]


def arm(data: Path, tmp: Path, name: str, runs: int, steps: int) -> tuple[float, list[float]]:
    outs = [tmp / f"{name}{i}" for i in range(runs)]
    t = time.perf_counter()
    if name.startswith("sequential"):
        for i, out in enumerate(outs):
            finish(start(data, out, steps, 2, i))
    else:
        for proc in [start(data, out, steps, 1, i) for i, out in enumerate(outs)]:
            finish(proc)
    return time.perf_counter() - t, [final_loss(out) for out in outs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=2, help="training runs per arm")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--data", help="shards of the default world (generated when absent)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = default_world_shards(args.data, tmp, 4000)
        times: dict[str, list[float]] = {"sequential": [], "side_by_side": []}
        for i in range(args.repeats):
            order = list(times) if i % 2 == 0 else list(reversed(times))
            losses = {}
            for name in order:
                seconds, losses[name] = arm(data, tmp, f"{name}_{i}_", args.runs, args.steps)
                times[name].append(seconds)
            if any(abs(a - b) > 1e-3 for a, b in zip(losses["sequential"], losses["side_by_side"])):
                raise SystemExit(f"the arms trained different models: {losses}")
            print(f"repeat {i}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.runs} runs x {args.steps} steps, batch 128, wall seconds (median of {args.repeats}):")
    for k, v in med.items():
        print(f"  {k:13s} {v:7.1f}")
    ratio = med["sequential"] / med["side_by_side"]
    print(f"ratio sequential/side_by_side = {ratio:.2f}  (> 1: side by side is faster)")


if __name__ == "__main__":
    main()
