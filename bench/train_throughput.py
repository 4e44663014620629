"""Training throughput: pipeline.train against open_clip's own trainer (open_clip_train).

    .venv/bin/python bench/train_throughput.py [--steps 80] [--repeats 2]

Same shards (the default synthetic world), model (mcl-tiny-vit), batch size, DataLoader
workers and threads, run one after the other in this process's machine, alternating,
`--repeats` times. Throughput is steady-state: samples/s over the steps after the first
`--skip` (open_clip_train: its logged mean batch time per interval; ours: the per-step
timestamps of metrics.jsonl). Prints samples/s of each and the ratios:
  stage 1 (no mask)  ours / open_clip   target >= 1.0
  masked stage       ours / open_clip   target >= 0.97 (labels from the json, mask on)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.world import default_world_shards  # noqa: E402

# open_clip_train 3.3.0's group_by_keys_nothrow does not expect the {} end-of-shard marker that
# webdataset 1.0.2's tar_file_expander yields (KeyError: 'fname'); the harness drops the markers.
OPEN_CLIP = """
import sys, open_clip
import open_clip_train.data as data
_group = data.group_by_keys_nothrow
data.group_by_keys_nothrow = lambda src, *a, **k: _group((s for s in src if s), *a, **k)
open_clip.add_model_config({configs!r})
from open_clip_train.main import main
main(sys.argv[1:])
"""


def run_open_clip(data: Path, logs: Path, steps: int, batch: int, workers: int, skip: int, log_every: int) -> float:
    n = steps * batch
    args = ["--train-data", f"{data}/{{00000..00009}}.tar", "--train-num-samples", str(n), "--dataset-type",
            "webdataset", "--model", "mcl-tiny-vit", "--batch-size", str(batch), "--epochs", "1",
            "--workers", str(workers), "--precision", "fp32", "--device", "cpu", "--lr", "5e-4", "--warmup", "10",
            "--save-frequency", "0", "--zeroshot-frequency", "0", "--val-frequency", "0", "--report-to", "",
            "--logs", str(logs), "--name", f"oc{os.getpid()}_{len(list(logs.iterdir())) if logs.exists() else 0}",
            "--log-every-n-steps", str(log_every), "--seed", "0"]
    code = OPEN_CLIP.format(configs=str(REPO / "configs" / "models"))
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"open_clip_train failed:\n{r.stderr[-3000:]}")
    times = []
    for line in r.stderr.splitlines() + r.stdout.splitlines():
        m = re.search(r"\[\s*(\d+)/\d+.*Batch \(t\): ([0-9.]+)", line)
        if m and int(m.group(1)) > skip * batch:
            times.append(float(m.group(2)))
    if not times:
        raise SystemExit("could not parse open_clip_train's log")
    return batch / statistics.mean(times)


def run_ours(data: Path, out: Path, steps: int, batch: int, workers: int, skip: int, masked: bool) -> float:
    args = [f"data={data}", f"out={out}", f"steps={steps}", f"batch_size={batch}", f"workers={workers}",
            "model=mcl-tiny-vit", "lr=5e-4", "warmup=10", f"save_every={steps}", "log_every=20",
            "augment=true"]  # open_clip_train's transforms too
    if masked:
        args += ["labels=json:attributes.background"]
    r = subprocess.run([sys.executable, "-m", "pipeline.train", *args], capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"pipeline.train failed:\n{r.stderr[-3000:]}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    t0, t1 = recs[skip - 1]["time"], recs[-1]["time"]
    return (len(recs) - skip) * batch / (t1 - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the rate")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--data", help="shards of the default world (generated when absent)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = default_world_shards(args.data, tmp, 10000)
        rates = {"open_clip": [], "ours": [], "ours_masked": []}
        for i in range(args.repeats):
            rates["open_clip"].append(run_open_clip(data, tmp / "oc", args.steps, args.batch_size, args.workers,
                                                    args.skip, 10))
            rates["ours"].append(run_ours(data, tmp / f"ours{i}", args.steps, args.batch_size, args.workers,
                                          args.skip, masked=False))
            rates["ours_masked"].append(run_ours(data, tmp / f"masked{i}", args.steps, args.batch_size,
                                                 args.workers, args.skip, masked=True))
            print(f"repeat {i}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()), flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"samples/s (median of {args.repeats}, batch {args.batch_size}, workers {args.workers}, "
          f"threads {os.environ.get('OMP_NUM_THREADS', 'default')}):")
    for k, v in med.items():
        print(f"  {k:12s} {v:8.1f}")
    print(f"ratio stage 1  ours/open_clip        = {med['ours'] / med['open_clip']:.3f}  (target >= 1.0)")
    print(f"ratio masked   ours_masked/open_clip = {med['ours_masked'] / med['open_clip']:.3f}  (target >= 0.97)")


if __name__ == "__main__":
    main()
