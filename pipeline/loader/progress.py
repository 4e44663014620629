"""The loader's counters over one epoch of a rank: what its DataLoader workers report.

Written per epoch to `loader_stats.jsonl` (summed over every worker of every rank), and kept
in checkpoints so that a resumed epoch counts its batches before the resume too.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.loader.batch import BatchInfo
from pipeline.loader.buckets import BucketStats
from pipeline.trainer.distributed import DistInfo, all_gather_object
from shards.reader import PROBLEM_KINDS

log = logging.getLogger("pipeline.train")  # its lines are the training's


class LoaderProgress:
    """What this rank's DataLoader workers have reported in one epoch, from their batches'
    BatchInfo: each worker's batches consumed (`positions`, for checkpoints), problem counts
    and bucketing counters so far.

    A resumed epoch starts from a checkpoint's `start` positions and `counters`: its workers
    count only what they meet after the resume point (pipeline.loader.slot, pipeline.loader.global_stream),
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
