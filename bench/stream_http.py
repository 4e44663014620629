"""Same-group batches from shards behind a URL: requests, bytes and samples/s at a real server.

    .venv/bin/python bench/stream_http.py [--samples 29997] [--shard-samples 9999] [--latency-ms 20]

The shards (the default world, 32 px, `--shard-samples` a shard: about CC12M's) and random
pseudo-labels over `--labels` groups are served by an HTTP server on localhost (Python's,
with byte ranges) that counts the requests and bytes it sends and waits `--latency-ms`
before each answer. One process reads them, batch `--batch-size`, the same decode, transform
and tokenizer, side by side:

  plain    wds.WebDataset over the shards' URLs (curl: one GET a shard, read in order)
  stream   pipeline.loader.regrouped.RegroupedStream (`bucket: stream`) over the regroup
           step's files for W = 1 (one GET a file, read in order)
  global   pipeline.loader.global_stream.GlobalBatchStream (`bucket: global`), as if its
           random reads went over HTTP: each sample's span read through fsspec (a range
           request, with fsspec's read-ahead); the launcher refuses it for URLs

Per loader over an epoch (global: its first `--global-read` samples): requests and MB sent per 1,000 samples, bytes sent over the
bytes of the samples delivered, samples/s (median of `--repeats`, the loaders alternating).
Targets: stream's requests within 1.5x of plain's, its bytes sent / used <= 1.05, its samples/s
>= 0.9x plain's.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class Counter:
    def __init__(self):
        self.lock, self.requests, self.bytes = threading.Lock(), 0, 0

    def add(self, n: int) -> None:
        with self.lock:
            self.requests += 1
            self.bytes += n

    def take(self) -> tuple[int, int]:
        with self.lock:
            out, self.requests, self.bytes = (self.requests, self.bytes), 0, 0
        return out


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Files with byte ranges (RFC 7233, one range), each answer counted and delayed."""
    counter: Counter
    latency: float

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool):
        time.sleep(self.latency)
        path = Path(self.translate_path(self.path))
        if path.is_dir():  # the listing (fsspec's ls)
            if body:
                f = self.list_directory(str(path))
                data = f.read() if f else b""
                self.wfile.write(data)
                self.counter.add(len(data))
            return
        if not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        start, end = 0, size
        ranged = self.headers.get("Range", "").startswith("bytes=")
        if ranged:
            a, b = self.headers["Range"][6:].split("-")
            start, end = (int(a), min(size, int(b) + 1)) if a else (max(0, size - int(b)), size)
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if body:
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(end - start)
            self.wfile.write(data)
            self.counter.add(len(data))


def serve(root: Path, latency: float) -> tuple[str, Counter]:
    counter = Counter()
    handler = type("Handler", (RangeHandler,), {"counter": counter, "latency": latency})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", counter


def make_data(root: Path, samples: int, per_shard: int, labels: int, batch: int) -> dict:
    """The shards, their index with random labels, and the regrouped files for W = 1."""
    import numpy as np

    from pipeline.loader.global_stream import SampleIndex
    from pipeline.loader.group_layout import lay_out
    from pipeline.loader.groups import coarse_groups
    from pipeline.loader.labels import stable_hash64
    from pipeline.regroup import layout_record, write
    from shards.generate import generate
    from shards.reader import ProblemLog, expand_urls, read_samples
    from shards.world import load_spec

    generate(root / "shards", load_spec(str(REPO / "configs/worlds/default.yaml")), samples, per_shard, seed=0,
             workers=2, progress=False)
    urls = expand_urls(str(root / "shards"))
    rows = [(i, s["__span__"], s["__key__"]) for i, u in enumerate(urls)
            for s in read_samples(u, ProblemLog(logger=None), decode=False)]
    rng = np.random.default_rng(0)
    label = rng.integers(labels, size=len(rows)).astype(np.int64)
    index = SampleIndex(urls, np.array([r[0] for r in rows], np.int32), np.array([r[1][0] for r in rows], np.int64),
                        np.array([r[1][1] - r[1][0] for r in rows], np.int64),
                        np.array([stable_hash64(r[2]) for r in rows], np.int64), label, (labels,), {})
    group, parent, fell = coarse_groups(label, (labels,), batch)
    layout = lay_out(group, parent, 1, batch, 8, max(1, per_shard // batch), seed=0)
    meta = layout_record(layout, "bench0000", {}, int(fell.sum()), {}, 0, 1)
    write(layout, index, group, meta, str(root / "regrouped"))
    return {"index": index, "group": group}


def loaders(root: Path, base: str, data: dict, batch: int):
    import dataclasses

    import open_clip
    import webdataset as wds

    from pipeline import models
    from pipeline.loader.global_stream import GlobalBatchStream
    from pipeline.loader.regrouped import RegroupedStream

    cfg = models.model_config("mcl-tiny-vit")
    transform = open_clip.image_transform(cfg["vision_cfg"]["image_size"], is_train=False)
    tokenizer = open_clip.get_tokenizer("mcl-tiny-vit")
    local = [u for u in data["index"].urls]
    remote = [f"{base}/shards/{os.path.basename(u)}" for u in local]

    def plain():
        ds = (wds.WebDataset(remote, shardshuffle=False, handler=wds.warn_and_continue, empty_check=False)
              .decode("pilrgb").to_tuple("jpg", "txt").map_tuple(transform, lambda t: tokenizer([t])[0])
              .batched(batch))
        return (len(b[0]) for b in ds)

    streamed = RegroupedStream(f"{base}/regrouped", transform, tokenizer, batch)  # reads its record once
    at_random = GlobalBatchStream(dataclasses.replace(data["index"], urls=remote), transform, tokenizer, batch,
                                  min_batches=0)
    epochs = {"stream": 0, "global": 0}

    def epoch_of(name, s):
        s.set_epoch(epochs[name])
        epochs[name] += 1
        return (int(b.valid.sum()) for b in s)

    def stream():
        return epoch_of("stream", streamed)

    def global_():
        return epoch_of("global", at_random)

    return {"plain": plain, "stream": stream, "global": global_}


def measure(make, limit: int, counter: Counter) -> tuple[float, int, int, int]:
    """(samples/s, samples, requests, bytes) over the first `limit` samples."""
    counter.take()
    n, t0 = 0, time.perf_counter()
    for got in make():
        n += got
        if n >= limit:
            break
    seconds = time.perf_counter() - t0
    requests, sent = counter.take()
    return n / seconds, n, requests, sent


def data_arguments(description: str) -> argparse.ArgumentParser:
    """The options of the data and the server, shared with bench/stream_s3.py."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--samples", type=int, default=29_997)
    ap.add_argument("--shard-samples", type=int, default=9_999)
    ap.add_argument("--labels", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=3)
    return ap


def main() -> None:
    ap = data_arguments(__doc__.split("\n\n")[0])
    ap.add_argument("--global-read", type=int, default=320, help="samples global reads per repeat (plain and "
                    "stream read a whole epoch)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        data = make_data(root, args.samples, args.shard_samples, args.labels, args.batch_size)
        base, counter = serve(root, args.latency_ms / 1000)
        print(f"{args.samples:,} samples in shards of {args.shard_samples:,} (and regrouped) in "
              f"{time.perf_counter() - started:.0f} s; served with {args.latency_ms:g} ms per request")
        made = loaders(root, base, data, args.batch_size)
        span = {"used": float(data["index"].length.mean())}
        runs: dict[str, list] = {name: [] for name in made}
        for _ in range(args.repeats):
            for name, make in made.items():
                runs[name].append(measure(make, args.global_read if name == "global" else args.samples, counter))
            print("  " + ", ".join(f"{n} {r[-1][0]:.0f} samples/s" for n, r in runs.items()), flush=True)
        summary = {}
        for name, rs in runs.items():
            rate = statistics.median(r[0] for r in rs)
            samples, requests, sent = (sum(r[i] for r in rs) for i in (1, 2, 3))
            summary[name] = (rate, 1000 * requests / samples, sent / samples * 1000 / 1e6,
                             sent / (samples * span["used"]))
            print(f"{name:<7} {rate:7.0f} samples/s  {summary[name][1]:8.2f} requests and {summary[name][2]:7.2f} MB "
                  f"sent per 1,000 samples  sent / used {summary[name][3]:6.2f}")
        s, p = summary["stream"], summary["plain"]
        print(f"stream / plain: requests {s[1] / p[1]:.2f}x (target <= 1.5), bytes sent / used {s[3]:.3f} "
              f"(target <= 1.05), samples/s {s[0] / p[0]:.2f}x (target >= 0.9)")


if __name__ == "__main__":
    main()
