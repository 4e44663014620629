"""Same-group batches from an S3-compatible server: plain streaming against `bucket=stream`.

    .venv/bin/python bench/stream_s3.py [--samples 29997] [--shard-samples 9999] [--latency-ms 20]

The data of bench/stream_http.py (shards of about CC12M's size, random pseudo-labels,
regrouped for W = 1) uploaded to moto's S3 server on localhost, read through a proxy that
waits `--latency-ms` before forwarding each request and counts requests and bytes. s3fs
(fsspec) reads, in one process, with the same decode, transform and tokenizer:

  plain    the shards streamed in order (shards.reader.read_samples: one GET a shard), batched
  stream   pipeline.loader.regrouped.RegroupedStream over the regrouped files (one GET a file)

Whole epochs, `--repeats` times, alternating. Target: stream's samples/s >= 0.9x plain's.
"""
from __future__ import annotations

import http.client
import http.server
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.stream_http import Counter, data_arguments, make_data, measure  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proxy(target_port: int, latency: float) -> tuple[int, Counter]:
    """An HTTP proxy to the S3 server that waits `latency` per request and counts them."""
    counter = Counter()

    class Forward(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _forward(self):
            time.sleep(latency)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
            conn = http.client.HTTPConnection("127.0.0.1", target_port, timeout=60)
            conn.request(self.command, self.path, body=body, headers=dict(self.headers))
            answer = conn.getresponse()
            data = answer.read()
            self.send_response(answer.status)
            for key, value in answer.getheaders():
                if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            counter.add(len(data))
            conn.close()

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1], counter


def main() -> None:
    args = data_arguments(__doc__.split("\n\n")[0]).parse_args()
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(3)
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
        import fsspec
        import open_clip
        import s3fs

        from pipeline import models
        from pipeline.loader.regrouped import RegroupedStream
        from shards.reader import ProblemLog, read_samples

        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            make_data(root, args.samples, args.shard_samples, args.labels, args.batch_size)
            fs = fsspec.filesystem("s3")
            fs.mkdir("bench")
            fs.put(str(root / "shards"), "bench/shards", recursive=True)
            fs.put(str(root / "regrouped"), "bench/regrouped", recursive=True)
        proxy_port, counter = proxy(port, args.latency_ms / 1000)
        os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy_port}"
        s3fs.S3FileSystem.clear_instance_cache()
        cfg = models.model_config("mcl-tiny-vit")
        transform = open_clip.image_transform(cfg["vision_cfg"]["image_size"], is_train=False)
        tokenizer = open_clip.get_tokenizer("mcl-tiny-vit")
        shards = sorted(f"s3://{p}" for p in fsspec.filesystem("s3").ls("bench/shards") if p.endswith(".tar"))
        streamed = RegroupedStream("s3://bench/regrouped", transform, tokenizer, args.batch_size)
        epoch = [0]

        def plain():
            batch = []
            for s in read_samples(shards, ProblemLog(logger=None), decode=True):
                batch.append((transform(s["image"]), s["text"]))
                if len(batch) == args.batch_size:
                    tokenizer([t for _, t in batch])
                    yield len(batch)
                    batch = []
            if batch:
                yield len(batch)

        def stream():
            streamed.set_epoch(epoch[0])
            epoch[0] += 1
            return (int(b.valid.sum()) for b in streamed)

        runs: dict[str, list] = {"plain": [], "stream": []}
        for _ in range(args.repeats):
            for name, make in (("plain", plain), ("stream", stream)):
                runs[name].append(measure(make, args.samples, counter))
            print("  " + ", ".join(f"{n} {r[-1][0]:.0f} samples/s" for n, r in runs.items()), flush=True)
        rates = {}
        for name, rs in runs.items():
            rates[name] = statistics.median(r[0] for r in rs)
            samples, requests, sent = (sum(r[i] for r in rs) for i in (1, 2, 3))
            print(f"{name:<7} {rates[name]:7.0f} samples/s  {1000 * requests / samples:6.2f} requests and "
                  f"{sent / samples * 1000 / 1e6:6.2f} MB per 1,000 samples")
        print(f"over S3 (moto) with {args.latency_ms:g} ms a request: stream / plain samples/s "
              f"{rates['stream'] / rates['plain']:.2f}x (target >= 0.9)")
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
