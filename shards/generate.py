"""Generate the synthetic world's training shards (img2dataset layout).

    python -m shards.generate OUT --world configs/worlds/default.yaml --num-samples 10000

Writes OUT/00000.tar ... with `{key}.jpg`, `{key}.txt` (caption) and `{key}.json`
(img2dataset metadata plus "attributes" and "mentioned"), one `.parquet` and
`_stats.json` per shard, `sizes.json` and `world.json` (the spec and the arguments).
Shard i's content depends only on (seed, i): same seed, same bytes, whatever the number
of workers. A rerun skips finished shards; other arguments in a used folder are refused.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from shards import world as W
from common.cli import ArgumentParser, UsageError, run_main, setup_logging
from common.io import write_json
from shards.writer import sample_meta, write_sizes, write_shard

log = logging.getLogger("shards.generate")
SAMPLE_DIGITS = 4  # key = 5-digit shard id + 4-digit index, as img2dataset does


def shard_name(i: int) -> str:
    return f"{i:05d}"


def make_key(shard: int, index: int) -> str:
    return f"{shard:05d}{index:0{SAMPLE_DIGITS}d}"


def shard_samples(spec: W.WorldSpec, seed: int, shard: int, n: int, captions: bool = True):
    """The samples of shard `shard` (a generator, deterministic in (seed, shard)); without
    `captions`, image-only data: no .txt member (the same images and .json)."""
    rng = np.random.default_rng([seed, shard])
    for i in range(n):
        key = make_key(shard, i)
        scene = W.sample_scene(spec, rng)
        mentioned = W.sample_mentions(spec, rng)
        text = W.caption(spec, scene, mentioned)
        jpg = W.encode_jpeg(W.render(spec, scene, rng), spec.jpeg_quality)
        meta = sample_meta(key, text, jpg, spec.image_size, spec.image_size,
                           attributes=scene, mentioned=sorted(k for k, v in mentioned.items() if v))
        yield {"__key__": key, "jpg": jpg, "json": meta, **({"txt": text} if captions else {})}


def _write_one(args) -> tuple[str, int]:
    spec_dict, seed, shard, n, out, captions = args
    spec = W.spec_from_dict(spec_dict)
    name = shard_name(shard)
    return name, write_shard(out, name, shard_samples(spec, seed, shard, n, captions))


def generate(out: str | os.PathLike, spec: W.WorldSpec, num_samples: int, samples_per_shard: int = 1000,
             seed: int = 0, workers: int = 1, progress: bool = True, captions: bool = True) -> dict:
    """Write the training shards (without `captions`: images and .json only); returns
    {shard basename: count}. Resumes a partial run."""
    if num_samples < 1 or samples_per_shard < 1:
        raise UsageError("--num-samples and --samples-per-shard must be >= 1")
    if samples_per_shard >= 10 ** SAMPLE_DIGITS:
        raise UsageError(f"--samples-per-shard must be < {10 ** SAMPLE_DIGITS}")
    out = Path(out)
    params = {"world": spec.to_dict(), "num_samples": num_samples,
              "samples_per_shard": samples_per_shard, "seed": seed, **({} if captions else {"captions": False})}
    _claim_folder(out, params)
    n_shards = -(-num_samples // samples_per_shard)
    jobs, sizes = [], {}
    for s in range(n_shards):
        n = min(samples_per_shard, num_samples - s * samples_per_shard)
        if (out / f"{shard_name(s)}.tar").exists():
            sizes[f"{shard_name(s)}.tar"] = n
        else:
            jobs.append((spec.to_dict(), seed, s, n, str(out), captions))
    if len(jobs) < n_shards:
        log.info("%s: %d of %d shards already written, resuming", out, n_shards - len(jobs), n_shards)
    bar = tqdm(total=len(jobs), desc="shards", unit="shard", disable=not progress or not jobs)
    if workers > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
            for name, n in pool.map(_write_one, jobs):
                sizes[f"{name}.tar"] = n
                bar.update()
    else:
        for job in jobs:
            name, n = _write_one(job)
            sizes[f"{name}.tar"] = n
            bar.update()
    bar.close()
    write_sizes(out, sizes)
    return dict(sorted(sizes.items()))


def _claim_folder(out: Path, params: dict) -> None:
    """Record the generation parameters; refuse a folder generated with others."""
    import json

    record = out / "world.json"
    if record.exists():
        try:
            old = json.loads(record.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"{record}: unreadable ({exc}); remove the folder to regenerate") from exc
        if old != params:
            raise UsageError(f"{out}: already holds a world generated with other parameters "
                             f"(see {record}); choose another folder or remove it")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(record, params)


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m shards.generate", description=__doc__)
    p.add_argument("out", help="output folder for the shards")
    W.add_world_argument(p)
    p.add_argument("--num-samples", type=int, default=10000, help="samples in all")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    p.add_argument("--no-captions", action="store_true", help="image-only shards: no .txt members")
    args = p.parse_args(argv)
    setup_logging()
    spec = W.spec_from_args(args)
    sizes = generate(args.out, spec, args.num_samples, args.samples_per_shard, args.seed, args.workers,
                     captions=not args.no_captions)
    log.info("wrote %d samples in %d shards to %s", sum(sizes.values()), len(sizes), args.out)
    return 0


if __name__ == "__main__":
    run_main(main, "python -m shards.generate")
