"""The demo run on the embedded synthetic world (the README's main command).

    python -m launch demo [--quick] [--out runs/demo]

Today it generates the world's training shards and its MMVP-format benchmark and
validates them; the MCL stages, merge and evaluation join it as those jobs land.
Every step is skipped when its outputs already exist, so a rerun is cheap.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from shards import world as W
from shards.cli import UsageError
from shards.generate import generate
from shards.io import read_yaml, write_json
from shards.mmvp_writer import write_benchmark
from shards.validate import validate

log = logging.getLogger("launch.demo")
CONFIGS = {False: "configs/demo.yaml", True: "configs/demo_quick.yaml"}


def load_config(path: str | Path) -> dict:
    try:
        cfg = read_yaml(path, "config")
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if not isinstance(cfg, dict) or "data" not in cfg:
        raise UsageError(f"{path}: a demo config needs a 'data' section")
    return cfg


def run_demo(config: str | Path, out: str | Path, workers: int = 1) -> dict:
    cfg = load_config(config)
    data = cfg["data"]
    try:
        spec = W.load_spec(data["world"])
    except (KeyError, ValueError) as exc:
        raise UsageError(f"{config}: data.world: {exc}") from exc
    out = Path(out)
    train_dir, bench_dir = out / "data" / "train", out / "data" / "mmvp"
    log.info("generating %d training samples in %s", data["num_samples"], train_dir)
    sizes = generate(train_dir, spec, int(data["num_samples"]), int(data.get("samples_per_shard", 1000)),
                     int(data.get("seed", 0)), workers)
    write_benchmark(bench_dir, spec, int(data.get("mmvp_pairs", 15)), int(data.get("mmvp_seed", 1)))
    record = train_dir / "validation.json"
    if record.exists():
        report = json.loads(record.read_text())
    else:
        report = validate(str(train_dir), decode=True, workers=workers)
        if report["problems"]:
            raise RuntimeError(f"{train_dir}: generated shards have problems: {report['problem_counts']}")
        write_json(record, report)
    summary = {"train": str(train_dir), "shards": len(sizes), "samples": report["samples"],
               "mmvp": str(bench_dir), "patterns": [a.pattern for a in spec.attributes]}
    print(f"world: {summary['samples']} training samples in {summary['shards']} shards at {train_dir}")
    print(f"benchmark: {bench_dir} with patterns {', '.join(summary['patterns'])}")
    return summary
