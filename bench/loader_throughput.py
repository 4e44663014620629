"""Loader throughput and memory: the label-batching loaders against a plain webdataset pipeline.

    .venv/bin/python bench/loader_throughput.py [--samples 20000] [--labels 144]

All read the same shards of the default synthetic world with the same decode (PIL, RGB)
and transform (mcl-tiny-vit's eval transform) and tokenizer, batch size 64, in this
process (no DataLoader workers, so only the pipelines differ):
  plain   wds.WebDataset -> shuffle(1000) -> decode("pilrgb") -> transform + tokenize -> batched(64)
          I/O: each shard read sequentially
  slot    pipeline.loader.slot.TrainStream, per-slot bucketing (`bucket: slot`), pseudo-labels from
          sidecars (random labels over --labels groups), bucket cap 16 x 64
          I/O: each shard read sequentially
  global  pipeline.loader.global_stream.GlobalBatchStream (`bucket: global`) on one rank: the
          epoch's plan of same-group steps, each sample read by its byte span
          I/O: random reads, one pread of one sample's members per sample
Prints samples/s of each and their ratios to plain (targets: slot >= 0.95, global >= 0.9),
then the peak RSS of the slot and global loaders over one epoch, each measured in a fresh
process, at two data set sizes ten times apart (target for slot: within 10%: memory is
bounded by the cap; global holds an index of 28 bytes a sample on top of one batch).
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


def make_data(out: Path, samples: int, labels: int) -> None:
    import numpy as np

    from pipeline.artifacts import SidecarMeta, write_sidecar
    from pipeline.stage import StageDir
    from shards.generate import generate
    from shards.reader import expand_urls, read_samples
    from shards.world import load_spec

    generate(out, load_spec(str(REPO / "configs/worlds/default.yaml")), samples, 1000, seed=0, workers=2,
             progress=False)
    meta = SidecarMeta(stage=1, k=labels, ks=(labels,), model_fp="bench", centroids_fp="bench", parent_fp="")
    rng = np.random.default_rng(0)
    for url in expand_urls(str(out)):
        samples = list(read_samples(url, decode=False))
        c = rng.integers(labels, size=len(samples))
        write_sidecar(StageDir(out / "stage").sidecar(url), [s["__key__"] for s in samples], c, c, meta,
                      spans=np.array([s["__span__"] for s in samples]))
    (out / "meta.json").write_text(json.dumps(meta.__dict__))


def pipelines(data: Path, batch: int):
    import collections

    import open_clip
    import webdataset as wds

    from pipeline import models
    from pipeline.artifacts import SidecarMeta, read_sidecar_columns
    from pipeline.stage import StageDir
    from pipeline.loader.groups import label_table
    from pipeline.loader.labels import SidecarLabeler
    from pipeline.loader.slot import TrainStream
    from shards.reader import expand_urls

    cfg = models.model_config("mcl-tiny-vit")
    transform = open_clip.image_transform(cfg["vision_cfg"]["image_size"], is_train=False)
    tokenizer = open_clip.get_tokenizer("mcl-tiny-vit")
    urls = expand_urls(str(data))

    def plain():
        ds = (wds.WebDataset(urls, shardshuffle=False, handler=wds.warn_and_continue, empty_check=False)
              .shuffle(1000).decode("pilrgb").to_tuple("jpg", "txt")
              .map_tuple(transform, lambda t: tokenizer([t])[0]).batched(batch))
        return iter(ds)

    def bucketed():
        m = json.loads((data / "meta.json").read_text())
        meta = SidecarMeta(**{**m, "ks": tuple(m["ks"])})
        sizes = collections.Counter()
        for u in urls:
            sizes.update(read_sidecar_columns(StageDir(data / "stage").sidecar(u))[2].tolist())
        labeler = SidecarLabeler(str(data / "stage"), meta, label_table(sizes, meta.ks, 0))
        stream = TrainStream(urls, transform, tokenizer, batch, None, 0, 0, 1, 1000, labeler, bucket_cap=16 * batch)
        stream.set_epoch(0)
        return iter(stream)

    def global_():
        from pipeline.loader.global_stream import GlobalBatchStream, read_index
        m = json.loads((data / "meta.json").read_text())
        stream = GlobalBatchStream(read_index(StageDir(data / "stage"), urls, tuple(m["ks"])), transform, tokenizer,
                                   batch, min_batches=0)
        stream.set_epoch(0)
        return iter(stream)

    return {"plain": plain, "slot": bucketed, "global": global_}


def rate(make, seconds: float, batch: int) -> float:
    it = make()
    next(it)  # warm up: open shards, fill the shuffle buffer
    n, t0 = 0, time.perf_counter()
    for _ in it:
        n += batch
        if time.perf_counter() - t0 > seconds:
            break
    return n / (time.perf_counter() - t0)


def peak_rss_mb(data: Path, batch: int, loader: str) -> float:
    """One whole epoch of `loader` in a fresh process; its peak RSS."""
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); sys.argv = ['x']\n"
            "from pathlib import Path\nimport bench.loader_throughput as b, resource\n"
            f"make = b.pipelines(Path({str(data)!r}), {batch})[{loader!r}]\n"
            "n = sum(1 for _ in make())\n"
            "print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])
    batches, kb = r.stdout.split()[-2:]
    return int(kb) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=20000, help="the larger data set (the smaller is a tenth)")
    p.add_argument("--labels", type=int, default=144)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seconds", type=float, default=20, help="per throughput measurement")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        big, small = Path(tmp) / "big", Path(tmp) / "small"
        make_data(big, args.samples, args.labels)
        make_data(small, args.samples // 10, args.labels)
        loaders = pipelines(big, args.batch_size)
        rates = {name: [] for name in loaders}
        for _ in range(args.repeats):  # alternate, so all see the same machine noise
            for name, make in loaders.items():
                rates[name].append(rate(make, args.seconds, args.batch_size))
            print(", ".join(f"{name} {r[-1]:.0f} samples/s" for name, r in rates.items()), flush=True)
        median = {name: statistics.median(r) for name, r in rates.items()}
        print(f"throughput (median of {args.repeats}): plain webdataset {median['plain']:.0f} samples/s "
              f"(sequential reads), slot {median['slot']:.0f} (sequential), global {median['global']:.0f} "
              f"(random reads, one per sample); ratios to plain: slot {median['slot'] / median['plain']:.3f} "
              f"(target >= 0.95), global {median['global'] / median['plain']:.3f} (target >= 0.9)")
        for name in ("slot", "global"):
            m_small, m_big = peak_rss_mb(small, args.batch_size, name), peak_rss_mb(big, args.batch_size, name)
            print(f"{name}: peak RSS over one epoch: {args.samples // 10} samples {m_small:.0f} MB, "
                  f"{args.samples} samples {m_big:.0f} MB, ratio {m_big / m_small:.3f}")


if __name__ == "__main__":
    main()
