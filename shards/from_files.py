"""Convert img2dataset's "files" layout into webdataset shards, keeping keys and bytes.

    python -m shards.from_files DIR OUT

DIR is what `img2dataset --output_format files` writes (and what the reference MCL code
reads): numbered folders `00000/`, `00001/`, ... of `{key}.jpg|png|webp`, `{key}.txt`
and optional `{key}.json`, with `00000.parquet` and `00000_stats.json` beside them. A
folder of such files without numbered sub-folders becomes one shard `00000`. Each folder
becomes `OUT/<folder>.tar` with every file of every key, byte for byte; the folder's
parquet and stats are copied (or made from the json files when absent) and `sizes.json`
counts the keys that have both an image and a caption. A rerun skips finished shards.
"""
from __future__ import annotations

import collections
import logging
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from common.cli import ArgumentParser, UsageError, run_main, setup_logging
from common.io import atomic_path
from shards.reader import IMAGE_EXTS
from shards.writer import write_sizes, write_shard

log = logging.getLogger("shards.from_files")


def find_folders(src: Path) -> list[tuple[str, Path]]:
    """(shard name, folder) pairs: numbered sub-folders, or `src` itself when it holds files."""
    if not src.is_dir():
        raise UsageError(f"{src}: no such folder")
    subs = sorted(p for p in src.iterdir() if p.is_dir() and p.name.isdigit())
    if subs:
        return [(p.name, p) for p in subs]
    if any(p.is_file() and p.suffix.lstrip(".").lower() in IMAGE_EXTS + ("txt",) for p in src.iterdir()):
        return [("00000", src)]
    raise UsageError(f"{src}: holds neither numbered folders nor image/caption files")


def folder_samples(folder: Path) -> list[dict]:
    """Files grouped by key (the name before the first dot), keys sorted."""
    groups: dict[str, dict] = collections.defaultdict(dict)
    for p in sorted(folder.iterdir()):
        if not p.is_file() or "." not in p.name or p.name.startswith("."):
            continue
        key, ext = p.name.split(".", 1)
        groups[key][ext] = p.read_bytes()
    return [{"__key__": k, **groups[k]} for k in sorted(groups)]


def convert_folder(name: str, folder: str, out: str, src: str) -> tuple[str, int, int]:
    """Write OUT/name.tar (+ parquet, stats); returns (name, usable samples, incomplete keys)."""
    out_p, src_p = Path(out), Path(src)
    samples = folder_samples(Path(folder))
    copied = 0
    for suffix in (".parquet", "_stats.json"):
        original = src_p / f"{name}{suffix}"
        if original.is_file():
            with atomic_path(out_p / original.name) as tmp:
                shutil.copyfile(original, tmp)
            copied += 1
    write_shard(out_p, name, samples, metadata=copied < 2)
    usable = sum(1 for s in samples if "txt" in s and any(e in s for e in IMAGE_EXTS))
    return name, usable, len(samples) - usable


def convert(src: str | os.PathLike, out: str | os.PathLike, workers: int = 1,
            overwrite: bool = False, progress: bool = True) -> dict:
    """Convert every folder; returns {shard basename: usable sample count}."""
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise UsageError(f"{out}: output folder must differ from the input folder")
    folders = find_folders(src)
    out.mkdir(parents=True, exist_ok=True)
    jobs, sizes = [], {}
    for name, folder in folders:
        done = out / f"{name}.tar"
        if done.exists() and not overwrite:
            keys = folder_samples(folder)
            sizes[done.name] = sum(1 for s in keys if "txt" in s and any(e in s for e in IMAGE_EXTS))
        else:
            jobs.append((name, str(folder), str(out), str(src)))
    if len(jobs) < len(folders):
        log.info("%d of %d shards already converted, skipped", len(folders) - len(jobs), len(folders))
    incomplete = 0
    bar = tqdm(total=len(jobs), desc="convert", unit="shard", disable=not progress or not jobs)
    if workers > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
            results = pool.map(convert_folder, *zip(*jobs))
            for name, n, bad in results:
                sizes[f"{name}.tar"], incomplete = n, incomplete + bad
                bar.update()
    else:
        for job in jobs:
            name, n, bad = convert_folder(*job)
            sizes[f"{name}.tar"], incomplete = n, incomplete + bad
            bar.update()
    bar.close()
    if incomplete:
        log.warning("%d keys lack an image or a caption; kept in the tars, readers will skip them", incomplete)
    write_sizes(out, sizes)
    return dict(sorted(sizes.items()))


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m shards.from_files", description=__doc__)
    p.add_argument("src", metavar="DIR", help="img2dataset 'files' output folder")
    p.add_argument("out", metavar="OUT", help="folder for the .tar shards")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    p.add_argument("--overwrite", action="store_true", help="rewrite shards that already exist")
    args = p.parse_args(argv)
    setup_logging()
    sizes = convert(args.src, args.out, args.workers, args.overwrite)
    log.info("wrote %d shards, %d samples, to %s", len(sizes), sum(sizes.values()), args.out)
    return 0


if __name__ == "__main__":
    run_main(main, "python -m shards.from_files")
