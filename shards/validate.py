"""Check a set of webdataset shards and write the sizes.json that open_clip reads.

    python -m shards.validate 'data/{00000..00099}.tar' [--sizes data/sizes.json]

Reads every sample (decoding images unless --no-decode), counts the good samples per
shard and lists the problems of shards.reader (missing, corrupt, duplicate, truncated...).
When a shard has an img2dataset `.parquet` beside it, keys it lists as downloaded but
that the tar lacks are reported as `missing_sample`. Exit code 0 when the problems stay
within --max-problem-rate of the samples, 1 when they exceed it, 2 for bad usage.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from common.cli import ArgumentParser, UsageError, run_main, setup_logging
from common.io import write_json
from shards.reader import (ProblemLog, is_local, check_samples, decode_images, expand_urls,
                           local_sibling, shard_basename, tar_samples)

log = logging.getLogger("shards.validate")


def validate_shard(url: str, decode: bool = True, captions: bool = True) -> dict:
    """Good-sample count and problems of one shard (run in a worker process); without
    `captions`, a sample needs no caption (image-only data)."""
    problems = ProblemLog(logger=None)
    keys_in_tar: set[str] = set()

    def note_keys(samples):
        for s in samples:
            keys_in_tar.add(s["__key__"])
            yield s

    good = check_samples(problems, captions=captions)(note_keys(tar_samples(problems)([url])))
    if decode:
        good = decode_images(problems)(good)
    count = sum(1 for _ in good)
    missing = []
    parquet = local_sibling(url, ".parquet")
    if parquet is not None and parquet.exists():
        missing = _missing_from_parquet(parquet, keys_in_tar)
    return {"url": url, "count": count, "problems": problems.items,
            "missing": [{"kind": "missing_sample", "shard": url, "key": k,
                         "detail": f"listed as downloaded in {parquet.name}"} for k in missing]}


def _missing_from_parquet(path: Path, keys_in_tar: set[str]) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["key", "status"])
    except Exception as exc:  # noqa: BLE001 - an unreadable parquet is worth a line, not a crash
        log.warning("%s: cannot read (%s); not checked", path, str(exc).splitlines()[0])
        return []
    rows = table.to_pylist()
    return sorted(r["key"] for r in rows if r["status"] == "success" and r["key"] not in keys_in_tar)


def validate(spec: str | Sequence[str], decode: bool = True, workers: int = 1, progress: bool = True,
             captions: bool = True) -> dict:
    """Validate every shard of `spec`; returns a report with per-shard counts and problems."""
    urls = expand_urls(spec)
    results = []
    bar = tqdm(total=len(urls), desc="validate", unit="shard", disable=not progress)
    if workers > 1 and len(urls) > 1:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(urls)), mp_context=ctx) as pool:
            for r in pool.map(validate_shard, urls, [decode] * len(urls), [captions] * len(urls)):
                results.append(r)
                bar.update()
    else:
        for url in urls:
            results.append(validate_shard(url, decode, captions))
            bar.update()
    bar.close()
    problems = [p for r in results for p in r["problems"] + r["missing"]]
    kinds: dict[str, int] = {}
    for p in problems:
        kinds[p["kind"]] = kinds.get(p["kind"], 0) + 1
    good = sum(r["count"] for r in results)
    return {
        "shards": [{"url": r["url"], "count": r["count"],
                    "problems": len(r["problems"]) + len(r["missing"])} for r in results],
        "samples": good,
        "problem_counts": kinds,
        "problems": problems,
        "problem_rate": len(problems) / max(1, good + len(problems)),
    }


def default_sizes_path(urls: list[str]) -> Path | None:
    """sizes.json beside the shards when they are local files in one folder."""
    if not all(is_local(u) for u in urls):
        return None
    folders = {os.path.dirname(os.path.abspath(u)) for u in urls}
    return Path(folders.pop()) / "sizes.json" if len(folders) == 1 else None


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m shards.validate", description=__doc__)
    p.add_argument("spec", help="shard spec: brace pattern, folder, URL; join several with ::")
    p.add_argument("--sizes", default="auto",
                   help="where to write sizes.json; 'auto' = beside local shards in one folder, "
                        "'none' = do not write")
    p.add_argument("--report", help="also write the full report (every problem) as JSON here")
    p.add_argument("--max-problem-rate", type=float, default=0.01,
                   help="exit 1 when problems / (good samples + problems) exceeds this")
    p.add_argument("--no-decode", action="store_true", help="do not decode images (faster, misses corrupt images)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    p.add_argument("--show", type=int, default=20, help="problems to list (all go to --report)")
    p.add_argument("--no-captions", action="store_true",
                   help="image-only data: a sample without a caption is a good one")
    args = p.parse_args(argv)
    setup_logging()
    if not 0.0 <= args.max_problem_rate <= 1.0:
        raise UsageError(f"--max-problem-rate must be in [0, 1], got {args.max_problem_rate}")
    urls = expand_urls(args.spec)
    report = validate(urls, decode=not args.no_decode, workers=args.workers, captions=not args.no_captions)

    width = max(len(shard_basename(s["url"])) for s in report["shards"])
    print(f"{'shard':<{width}}  {'samples':>8}  {'problems':>8}")
    for s in report["shards"]:
        print(f"{shard_basename(s['url']):<{width}}  {s['count']:>8}  {s['problems']:>8}")
    print(f"{'total':<{width}}  {report['samples']:>8}  {len(report['problems']):>8}")
    for item in report["problems"][: args.show]:
        key = f" key {item['key']}" if item["key"] is not None else ""
        detail = f" ({item['detail']})" if item["detail"] else ""
        print(f"  {item['kind']}: {item['shard']}{key}{detail}")
    if len(report["problems"]) > args.show:
        print(f"  ... {len(report['problems']) - args.show} more (use --report FILE for all)")
    counts = ", ".join(f"{k}={v}" for k, v in sorted(report["problem_counts"].items())) or "none"
    print(f"problems: {counts}; rate {report['problem_rate']:.4f} (max {args.max_problem_rate})")

    sizes_path = default_sizes_path(urls) if args.sizes == "auto" else (
        None if args.sizes == "none" else Path(args.sizes))
    if sizes_path is not None:
        try:
            write_json(sizes_path, {shard_basename(s["url"]): s["count"] for s in report["shards"]})
        except OSError as exc:
            raise UsageError(f"{sizes_path}: cannot write sizes.json ({exc.strerror}); "
                             "pass --sizes PATH or --sizes none") from exc
        print(f"wrote {sizes_path}")
    elif args.sizes == "auto":
        print("sizes.json not written (shards not in one local folder): pass --sizes PATH")
    if args.report:
        write_json(args.report, report)
    if report["problem_rate"] > args.max_problem_rate:
        print(f"FAILED: problem rate {report['problem_rate']:.4f} exceeds {args.max_problem_rate}")
        return 1
    return 0


if __name__ == "__main__":
    run_main(main, "python -m shards.validate")
