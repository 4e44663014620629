"""Embed every sample of a stage's training shards with that stage's model.

    python -m pipeline.embed --model runs/r/stage1/model --data SPEC --out runs/r/stage1 \\
        [--tower image|text|both] [--task I --tasks N]

Task I of N takes every N-th shard (a Slurm array runs the N tasks). For each shard it
writes `OUT/embeddings/<shard>.npz` (see pipeline.artifacts): L2-normalised float16
embeddings of the chosen tower (image by default; text; or both, each normalised, then
concatenated and normalised again) with the samples' keys. Shards already embedded by the
same model are skipped, so a rerun resumes. Runs on the GPU (bf16 autocast) when present.

A shard that cannot be read (unreadable_shard: a failed open, an I/O error midway) is read
again, up to `--read-attempts` times, `--retry-wait` seconds apart (doubling each time); one
still unreadable gets no embeddings file (nothing is recorded as done for it): the task
embeds its other shards, then exits 2 with one line naming the shard, and a rerun reads it
again.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from pipeline import models
from pipeline.artifacts import embeddings_model_fp, write_embeddings
from pipeline.stage import StageDir
from common.cli import UsageError, run_main, setup_logging
from common.spec import check, from_args, param, parser
from shards.reader import ProblemLog, expand_urls, good_samples

log = logging.getLogger("pipeline.embed")
TOWERS = ("image", "text", "both")


def skipped_keys(problems: ProblemLog, url: str) -> dict[str, str]:
    """{key: kind} of the samples of `url` the reader dropped (bad_json keeps its sample), the
    first problem of a key when it has several (a corrupt image and a duplicate of it); a
    problem of the shard itself (a truncated tar) under `__shard__:<kind>` (a key no sample
    can have: the reader ignores keys starting with "__"), so that a loader that never reads
    the shard whole still counts it."""
    skipped: dict[str, str] = {}
    for p in problems.items:
        if p["shard"] == url and p["kind"] != "bad_json":
            skipped.setdefault(p["key"] or f"__shard__:{p['kind']}", p["kind"])
    return skipped


class UnreadableShards(UsageError):
    """Shards that could not be read after every attempt: no embeddings file was written for them."""


class ShardBatches(IterableDataset):
    """Batches of decoded, transformed samples, whole shards per DataLoader worker; the
    last batch of each shard is flagged so the caller can write the shard, and carries the
    keys of the shard's samples the reader skipped, with the problem kind ({key: kind}).
    `transform` or `tokenizer` None: that tower's input is not prepared.

    A shard the reader finds unreadable is read again (`read_attempts` in all, `retry_wait`
    seconds before the second, doubling): a `{"url", "retry": True}` item tells the caller
    to drop what it had of the shard; after the last attempt a `{"url", "failed": detail}`
    item replaces the last batch."""

    def __init__(self, urls, transform, tokenizer, batch_size: int, read_attempts: int = 1, retry_wait: float = 0.0,
                 captions: bool = True):
        super().__init__()
        self.captions = captions  # False (an image-only model): a sample needs no caption
        self.urls, self.transform, self.tokenizer, self.batch_size = list(urls), transform, tokenizer, batch_size
        self.read_attempts, self.retry_wait = max(1, read_attempts), retry_wait

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for url in self.urls[worker::workers]:
            for attempt in range(1, self.read_attempts + 1):
                problems = ProblemLog()  # a new count per attempt: a read again counts its problems again
                stages = good_samples(problems, decode=True, captions=self.captions)
                samples = wds.DataPipeline(lambda: iter([url]), *stages)
                batch = []
                for s in samples:
                    batch.append(s)
                    if len(batch) == self.batch_size:
                        yield self._collate(url, batch, last=False)
                        batch = []
                unreadable = [p["detail"] for p in problems.items if p["kind"] == "unreadable_shard"]
                if not unreadable:
                    final = self._collate(url, batch, last=True)
                    final["skipped"] = skipped_keys(problems, url)
                    yield final
                    break
                if attempt == self.read_attempts:
                    yield {"url": url, "failed": unreadable[0] or "unreadable", "attempts": attempt}
                    break
                wait = self.retry_wait * 2 ** (attempt - 1)
                log.warning("%s: unreadable (%s), attempt %d of %d; reading it again in %.1fs", url,
                            unreadable[0], attempt, self.read_attempts, wait)
                yield {"url": url, "retry": True}
                time.sleep(wait)

    def _collate(self, url, batch, last):
        images = torch.stack([self.transform(s["image"]) for s in batch]) \
            if batch and self.transform is not None else torch.empty(0)
        tokens = self.tokenizer([s["text"] for s in batch]) \
            if batch and self.tokenizer is not None else torch.empty(0, dtype=torch.long)
        attrs = [json.dumps(s["json"]["attributes"], sort_keys=True)
                 if isinstance(s["json"], dict) and "attributes" in s["json"] else "" for s in batch]
        return {"url": url, "last": last, "keys": [s["__key__"] for s in batch],
                "captions": [s["text"] for s in batch], "attributes": attrs, "images": images, "tokens": tokens,
                "spans": [s["__span__"] for s in batch]}


@torch.no_grad()
def encode(model, batch: dict, tower: str, device, autocast) -> np.ndarray:
    feats = []
    with autocast:
        if tower in ("image", "both"):
            feats.append(F.normalize(model.encode_image(batch["images"].to(device)).float(), dim=-1))
        if tower in ("text", "both"):
            feats.append(F.normalize(model.encode_text(batch["tokens"].to(device)).float(), dim=-1))
    out = torch.cat(feats, dim=-1)
    if tower == "both":
        out = F.normalize(out, dim=-1)
    return out.cpu().numpy()


@dataclass(frozen=True)
class EmbedSpec:
    """The embedding of a stage's training shards by its model (one task of an array)."""
    model: str = param(help="saved stage model folder, or an open_clip architecture")
    data: str = param(help="shard spec of the training data")
    out: str = param(help="the stage folder (embeddings/ goes inside)", result=False)
    tower: str = param("image", "what to embed", choices=TOWERS)
    pretrained: str | None = param(None, "pretrained tag or file, with an architecture name")
    batch_size: int = param(256, "samples per forward pass", result=False)
    workers: int = param(2, "DataLoader workers", result=False)
    read_attempts: int = param(3, "reads of a shard that cannot be read before it is given up (no file written; "
                               "the task exits 2 naming it, a rerun reads it again)", result=False)
    retry_wait: float = param(2.0, "seconds before reading an unreadable shard again (doubling each time)",
                              result=False)
    task: int = param(0, "this task's index", result=False, env="SLURM_ARRAY_TASK_ID")
    tasks: int = param(1, "number of tasks", result=False, env="SLURM_ARRAY_TASK_COUNT")

    def problems(self) -> list[str]:
        return [f"{name}: must be >= {low}, got {getattr(self, name)}" for name, low in
                (("batch_size", 1), ("workers", 0), ("tasks", 1), ("read_attempts", 1), ("retry_wait", 0))
                if getattr(self, name) < low]


def is_done(spec: EmbedSpec) -> bool:
    """Every shard of the data (all tasks') is embedded by this model and tower."""
    try:
        fp = models.model_fingerprint(spec.model, spec.pretrained, spec.tower)
        return all(embeddings_model_fp(p) == fp for p in StageDir(spec.out).embedding_paths(expand_urls(spec.data)))
    except (OSError, UsageError):
        return False


def embed(spec: EmbedSpec, progress: bool = True) -> list[Path]:
    """Embed this task's shards; returns the embedding files of the task (old and new).
    UnreadableShards (a UsageError: one line, exit 2) after the others are written when a
    shard could not be read in `read_attempts` attempts."""
    tower, task, tasks = spec.tower, spec.task, spec.tasks
    check(spec)
    if tower not in TOWERS:
        raise UsageError(f"--tower must be one of {TOWERS}, got {tower!r}")
    if not 0 <= task < tasks:
        raise UsageError(f"--task must be in [0, {tasks}), got {task}")
    all_urls = expand_urls(spec.data)
    named = dict(zip(all_urls, StageDir(spec.out).embedding_paths(all_urls)))  # names from the whole data set
    urls = all_urls[task::tasks]
    fp = models.model_fingerprint(spec.model, spec.pretrained, tower)
    out = spec.out
    paths = {u: named[u] for u in urls}
    todo = [u for u in urls if embeddings_model_fp(paths[u]) != fp]
    if len(todo) < len(urls):
        log.info("%d of %d shards already embedded by this model, skipped", len(urls) - len(todo), len(urls))
    if not todo:
        return list(paths.values())
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    model, preprocess, tokenizer = models.load(spec.model, spec.pretrained, device)
    image_only = getattr(model, "modality", "clip") == "image"
    if image_only and tower != "image":
        raise UsageError(f"{spec.model}: an image-only model has no text tower; embed it with --tower image")
    loader = DataLoader(ShardBatches(todo, preprocess if tower != "text" else None,  # only what the tower needs
                                     tokenizer if tower != "image" else None, spec.batch_size,
                                     spec.read_attempts, spec.retry_wait, captions=not image_only), batch_size=None,
                        num_workers=min(spec.workers, len(todo)), pin_memory=device.type == "cuda")
    pending: dict[str, dict] = {}
    bar = tqdm(total=len(todo), desc="embed", unit="shard", disable=not progress)
    n_samples = 0
    failed: dict[str, str] = {}
    for batch in loader:
        if batch.get("retry") or batch.get("failed"):
            dropped = pending.pop(batch["url"], None)
            n_samples -= sum(len(e) for e in dropped["emb"]) if dropped else 0
            if batch.get("failed"):
                failed[batch["url"]] = f"{batch['failed']}; {batch['attempts']} attempts"
                bar.update()
            continue
        acc = pending.setdefault(batch["url"], {"emb": [], "keys": [], "captions": [], "attributes": [], "spans": []})
        if batch["keys"]:
            acc["emb"].append(encode(model, batch, tower, device, autocast))
            acc["keys"] += batch["keys"]
            acc["captions"] += batch["captions"]
            acc["attributes"] += batch["attributes"]
            acc["spans"] += batch["spans"]
            n_samples += len(batch["keys"])
        if batch["last"]:
            acc = pending.pop(batch["url"])
            emb = np.concatenate(acc["emb"]) if acc["emb"] else np.zeros((0, 0), np.float32)
            embedded = set(acc["keys"])
            write_embeddings(paths[batch["url"]], emb, acc["keys"], acc["captions"], acc["attributes"], fp,
                             skipped={k: v for k, v in batch["skipped"].items() if k not in embedded},
                             spans=acc["spans"])
            bar.update()
            bar.set_postfix(samples=n_samples)
    bar.close()
    log.info("embedded %d samples of %d shards (task %d of %d) into %s", n_samples, len(todo) - len(failed), task,
             tasks, Path(out) / "embeddings")
    if failed:
        url, why = next(iter(failed.items()))
        others = f" (and {len(failed) - 1} more shards)" if len(failed) > 1 else ""
        raise UnreadableShards(f"shard {url} could not be read ({why}){others}: no embeddings written for it, "
                               f"the task's other {len(urls) - len(failed)} shards are embedded; rerun to read it again")
    return list(paths.values())


def main(argv: Sequence[str] | None = None) -> int:
    spec = from_args(EmbedSpec, parser(EmbedSpec, "python -m pipeline.embed", __doc__).parse_args(argv))
    setup_logging()
    if not os.path.isdir(spec.model) and not models.known_architecture(spec.model):
        raise UsageError(f"--model: {spec.model} is neither a model folder nor an open_clip architecture")
    embed(spec)
    return 0


if __name__ == "__main__":
    run_main(main, "python -m pipeline.embed")
