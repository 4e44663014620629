"""What a training run reports: each step's metrics and log line, each epoch's loader counters.

    metrics.jsonl        one line per step (rank 0), trimmed back to the resumed step on a
                         resume; mirrored to the config's `report_to` trackers (pipeline.trackers)
    loader_stats.jsonl   one line per epoch of the cluster-bucketed loader, summed over
                         every worker of every rank; a resumed epoch's line counts the
                         batches before the resume too (their counters are checkpointed)
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

import torch

from common.io import atomic_output
from pipeline.batch import BatchInfo
from pipeline.buckets import BucketStats
from pipeline.distributed import DistInfo, all_gather_object
from pipeline.trackers import Trackers
from shards.reader import PROBLEM_KINDS

log = logging.getLogger("pipeline.train")
NOT_SCALARS = ("step", "label", "time")  # keys of a step's record that no dashboard plots


class MetricsLog:
    """Each step's record, from the (resumed) `start_step` on; its log line every `log_every`
    steps and at the last one, with throughput and ETA since the start of this process."""

    def __init__(self, out: Path, start_step: int, total_steps: int, samples_per_step: int, log_every: int,
                 info: DistInfo, trackers: Callable[[], Trackers] | None = None):
        """`trackers` makes the dashboards' writers (called on the main rank only)."""
        self.start_step, self.total_steps, self.samples_per_step = start_step, total_steps, samples_per_step
        self.log_every, self.enabled = log_every, info.is_main
        self.path, self.trackers, self.last = out / "metrics.jsonl", None, {}
        if self.enabled:
            self._open()
            self.trackers = trackers() if trackers else None
        self.t_start = time.time()

    def _open(self) -> None:
        keep_records(self.path, lambda record: record["step"] <= self.start_step)
        self.file = open(self.path, "a")

    def step(self, step: int, epoch: int, loss: torch.Tensor, lr: float, effective_negatives: float,
             logit_scale: torch.Tensor, label: int | None = None) -> None:
        """Record step `step` (just taken); `logit_scale` is the model's log-scale parameter,
        `label` the pseudo-label most of this rank's batch carried (None: unlabelled)."""
        elapsed = time.time() - self.t_start
        sps = (step - self.start_step) * self.samples_per_step / max(elapsed, 1e-9)
        self.last = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": lr, "samples_per_s": sps,
                     "effective_negatives": effective_negatives, "logit_scale": logit_scale.exp().item(),
                     "time": time.time()}
        if label is not None:
            self.last["label"] = label
        self._write(self.last)
        if self.enabled and (step % self.log_every == 0 or step == self.total_steps):
            eta = (self.total_steps - step) * elapsed / max(step - self.start_step, 1)
            log.info("step %d/%d epoch %d loss %.4f lr %.2e %.1f samples/s eta %s eff_neg %.1f scale %.1f",
                     step, self.total_steps, epoch, self.last["loss"], lr, sps, _hms(eta),
                     effective_negatives, self.last["logit_scale"])

    def _write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.trackers is not None:
            self.trackers.log({f"train/{k}": v for k, v in record.items()
                               if k not in NOT_SCALARS and isinstance(v, (int, float))}, record["step"])

    def epoch_end(self, step: int, loader: dict | None, problems: dict[str, int]) -> None:
        """The dashboards get an epoch's loader counters and data problems at its last step."""
        if self.trackers is None:
            return
        scalars = {f"loader/{k}": v for k, v in (loader or {}).items()
                   if k not in ("epoch", "step", "complete") and isinstance(v, (int, float))}
        scalars.update({f"loader/problems_{kind}": n for kind, n in problems.items()})
        if scalars:
            self.trackers.log(scalars, step)

    def close(self, failed: bool = False) -> None:
        if self.enabled:
            self.file.close()
            if self.trackers is not None:
                self.trackers.close(failed)


def keep_records(path: Path, keep: Callable[[dict], bool]) -> None:
    """Rewrite the JSON-lines file `path` (if any) with only the records `keep` accepts."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and keep(json.loads(line))]
        with atomic_output(path, "w") as f:
            f.write("".join(line + "\n" for line in kept))


class LoaderProgress:
    """What this rank's DataLoader workers have reported in one epoch, from their batches'
    BatchInfo: each worker's batches consumed (`positions`, for checkpoints), problem counts
    and bucketing counters so far.

    A resumed epoch starts from a checkpoint's `start` positions and `counters`: its workers
    count only what they meet after the resume point (pipeline.data, pipeline.global_stream),
    and this adds the checkpoint's counts, so the epoch's totals are those of a run that was
    never interrupted."""

    def __init__(self, start: dict[int, int], counters: dict[int, dict] | None = None):
        self.positions = dict(start)
        self.base = {int(w): (BucketStats.from_list(c["stats"]), [int(n) for n in c["problems"]])
                     for w, c in (counters or {}).items()}
        self.stats: dict[int, BucketStats] = {w: stats for w, (stats, _) in self.base.items()}
        self.problems: dict[int, list[int]] = {w: problems for w, (_, problems) in self.base.items()}

    def update(self, info: BatchInfo | None) -> None:
        if info is not None:
            stats, problems = self.base.get(info.worker, (BucketStats(), [0] * len(PROBLEM_KINDS)))
            self.positions[info.worker] = info.made
            self.problems[info.worker] = [a + b for a, b in zip(problems, info.problems)]
            self.stats[info.worker] = stats.merge(info.stats)

    def counters(self) -> dict[int, dict]:
        """Each worker's counters so far this epoch, as a checkpoint keeps them."""
        return {w: {"stats": self.stats[w].as_list(), "problems": list(self.problems[w])} for w in self.stats}

    def report_stats(self, out: Path, epoch: int, step: int, info: DistInfo, complete: bool) -> dict | None:
        """Sum the bucketing counters over workers and ranks; log them, append them to
        loader_stats.jsonl and return that record on the main rank (collective)."""
        total = BucketStats()
        for stats in self.stats.values():
            total = total.merge(stats)
        ranks = all_gather_object(total.as_list(), info)
        total = BucketStats()
        for values in ranks:
            total = total.merge(BucketStats.from_list(values))
        if info.is_main:
            record = {"epoch": epoch, "step": step, "complete": complete, **total.__dict__}
            with open(out / "loader_stats.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            log.info("epoch %d%s loader: %d samples, %d pure and %d mixed batches (%d early at the cap, %d short), "
                     "%d fallback samples, %d without a label, max %d buffered per worker", epoch,
                     "" if complete else " (stopped at the step budget)", total.samples,
                     total.pure_batches, total.mixed_batches, total.early_batches, total.short_batches,
                     total.fallback_samples, total.missing_labels, total.max_buffered)
            return record
        return None

    def report_problems(self, epoch: int, info: DistInfo, known: dict[str, int] | None = None) -> dict[str, int]:
        """{kind: count} of the data problems the workers of all ranks met this epoch (each
        worker logs its first ones itself), plus `known` ones (samples an earlier job skipped,
        which the loader never reads); the main rank logs the total once (collective)."""
        total = [0] * len(PROBLEM_KINDS)
        for values in all_gather_object([sum(col) for col in zip(*self.problems.values())], info):
            total = [a + b for a, b in zip(total, values or [0] * len(PROBLEM_KINDS))]
        for kind, n in (known or {}).items():
            total[PROBLEM_KINDS.index(kind)] += n
        counts = {k: n for k, n in zip(PROBLEM_KINDS, total) if n}
        if counts and info.is_main:
            log.warning("epoch %d: the loader skipped data problems: %s", epoch,
                        ", ".join(f"{k}={n}" for k, n in counts.items()))
        return counts


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
