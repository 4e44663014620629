"""Host memory held by a rank's prefetched training batches: uint8 images (normalised on the
device) against the float32 images the loader made before.

    .venv/bin/python bench/host_memory.py [--batch-size 256] [--workers 2] [--repeats 3]

Both arms run the training loader (pipeline.loader.slot.TrainStream) under a real DataLoader
with `--workers` worker processes, over the same shards of the default synthetic world,
with ViT-L-14's train transform (open_clip, 224 px, RandomResizedCrop) and tokenizer:
  float32  the whole transform in the workers (ToTensor + Normalize): float32 batches
  uint8    pipeline.loader.images.split_transform's uint8 part in the workers: uint8 batches
Each arm keeps prefetch 4 per worker (the loader's fixed value before), so the ratio is the
batches' own. Once the workers have filled their prefetch (the sum reaches workers x 4 of
the batch one arm makes in the main process first) and 2 s more, the script sums the
shared-memory segments (torch's /dev/shm files, deduplicated by inode) that the rank's
processes hold open or mapped: the prefetched batches. Arms alternate; medians of the
repeats. Then the bytes per held batch scale to the paper config's rank (B = 1,000 x 224 px)
with 16 workers x prefetch 4 (before) and with the plans pipeline.loader.memory makes now.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PREFETCH = 4
GB = 1e9


def shm_bytes(pids: list[int]) -> int:
    """Bytes of the /dev/shm segments (torch's shared tensors) that `pids` hold open or mapped,
    each segment counted once."""
    seen: dict[tuple[int, int], int] = {}
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if "/dev/shm/torch_" not in os.readlink(f"{fd_dir}/{fd}"):
                    continue
                st = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            seen[(st.st_dev, st.st_ino)] = max(seen.get((st.st_dev, st.st_ino), 0), st.st_size)
        try:
            maps = open(f"/proc/{pid}/maps").read().splitlines()
        except OSError:
            continue
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and "/dev/shm/torch_" in parts[5]:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                key = (-1, int(parts[4]))  # inode only: maps give no device number
                seen[key] = max(seen.get(key, 0), hi - lo)
    # a segment seen both as an fd and as a mapping: keep one
    by_inode: dict[int, int] = {}
    for (_, ino), size in seen.items():
        by_inode[ino] = max(by_inode.get(ino, 0), size)
    return sum(by_inode.values())


def held(stream, workers: int, settle_s: float = 2.0, limit_s: float = 600.0) -> tuple[int, int, int]:
    """(shared-memory bytes held once the DataLoader's workers have filled their prefetch,
    bytes of one batch's tensors, batches held)."""
    from pipeline.loader.workers import make_loader

    stream.set_epoch(0)
    batch = next(iter(stream))  # one batch made here: what a full prefetch must reach
    one = sum(t.nbytes for t in (batch.images, batch.tokens, batch.labels, batch.caption_ids, batch.valid))
    n = workers * PREFETCH
    it = iter(make_loader(stream, workers, seed=0, prefetch=PREFETCH))
    pids = [os.getpid()] + [w.pid for w in it._workers]
    start = time.monotonic()
    while shm_bytes(pids) < 0.99 * n * one and time.monotonic() - start < limit_s:
        time.sleep(0.2)
    time.sleep(settle_s)  # nothing more comes: the workers wait for the trainer
    got = shm_bytes(pids)
    it._shutdown_workers()
    return got, one, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="shards of the default world (default: generated)")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import open_clip
    import torch

    from bench.world import default_world_shards
    from pipeline.loader.images import split_transform
    from pipeline.loader.labels import no_labels
    from pipeline.loader.memory import auto_workers, batch_bytes, plan_loader
    from pipeline.loader.slot import TrainStream
    from shards.reader import expand_urls

    torch.set_num_threads(1)
    transform = open_clip.image_transform(224, is_train=True, mean=open_clip.OPENAI_DATASET_MEAN,
                                          std=open_clip.OPENAI_DATASET_STD)
    to_uint8, _ = split_transform(transform)
    tokenizer = open_clip.get_tokenizer("ViT-L-14")
    with tempfile.TemporaryDirectory() as tmp:
        urls = expand_urls(str(default_world_shards(args.data, Path(tmp), args.samples)))
        arms = {"float32": transform, "uint8": to_uint8}
        found = {name: [] for name in arms}
        for r in range(args.repeats):  # alternate, so both see the same machine
            for name, tf in arms.items():
                stream = TrainStream(urls, tf, tokenizer, args.batch_size, 10 ** 6, seed=r, shuffle_buffer=100,
                                     labeler=no_labels)
                found[name].append(held(stream, args.workers))
            print(", ".join(f"{name} {v[-1][0] / 1e6:.1f} MB held ({v[-1][2]} batches of {v[-1][1] / 1e6:.1f} MB)"
                            for name, v in found.items()), flush=True)
    med = {name: statistics.median(v[0] for v in values) for name, values in found.items()}
    n = found["uint8"][0][2]
    print(f"held by the prefetched batches of one rank, B={args.batch_size}, {args.workers} workers x prefetch "
          f"{PREFETCH} (median of {args.repeats}): float32 {med['float32'] / 1e6:.1f} MB, uint8 "
          f"{med['uint8'] / 1e6:.1f} MB: {med['float32'] / med['uint8']:.2f}x less")

    # the paper config's rank: B = 1,000 at 224 px; bytes per held batch as measured, scaled by B
    scale = 1000 / args.batch_size
    per = {name: med[name] / n * scale for name in med}
    old = per["float32"] * 16 * PREFETCH
    print(f"B=1000, 224 px, per rank: float32 with 16 workers x prefetch 4 (before): {old / GB:.1f} GB; uint8 with "
          f"16 workers x prefetch 4: {per['uint8'] * 16 * PREFETCH / GB:.1f} GB "
          f"({old / (per['uint8'] * 16 * PREFETCH):.2f}x less)")
    computed = batch_bytes(1000, (3, 224, 224), 77)
    for workers, cpus, what in ((16, 12, "workers: 16"), (None, 12, "workers: auto on 12 CPUs per task")):
        plan = plan_loader(workers, None, 4.0, computed, cpus)
        held_now = per["uint8"] * plan.workers * plan.prefetch
        print(f"  now, {what}, loader_memory_gb 4: {plan.workers} workers x prefetch {plan.prefetch}: "
              f"{held_now / GB:.1f} GB per rank, {8 * held_now / GB:.0f} GB per 8-GPU node "
              f"({old / held_now:.1f}x less; pipeline.loader.memory plans {plan.held_bytes / GB:.1f} GB)")
    print(f"(auto workers here: {auto_workers()} of {len(os.sched_getaffinity(0))} CPUs)")


if __name__ == "__main__":
    main()
