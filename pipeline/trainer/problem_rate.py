"""Stop a training whose data is mostly problems.

The loaders skip (and count) corrupt samples and unreadable shards; a few are normal, but
a training that skips many is training on a different data set than asked (a storage
failure, the wrong folder, a broken download). At every log step the trainer sums, over
all ranks, the samples it trained on and the problems the loaders met since this process
started, and refuses past `TrainConfig.max_problem_rate` (as `shards.validate` does):

    rate = problems / (samples + problems)

only once at least `min_samples` samples were read (good ones and problems) (a handful of bad samples at the start
of a shard says little). `bad_json` is not counted: its sample is kept.
"""
from __future__ import annotations

import torch

from common.cli import UsageError
from shards.reader import PROBLEM_KINDS

COUNTED = tuple(k for k in PROBLEM_KINDS if k != "bad_json")
MIN_SAMPLES = 1000


class ProblemRateExceeded(UsageError):
    """The loaders skipped more than max_problem_rate of what they read: one line, exit 2."""


def _total(problems: dict[int, list[int]]) -> list[int]:
    """Per kind (PROBLEM_KINDS order), summed over a LoaderProgress's workers."""
    out = [0] * len(PROBLEM_KINDS)
    for counts in problems.values():
        out = [a + b for a, b in zip(out, counts)]
    return out


class ProblemRate:
    """This process's samples and loader problems, checked against `limit` across ranks."""

    def __init__(self, limit: float, info, min_samples: int = MIN_SAMPLES, key: str = "max_problem_rate"):
        self.limit, self.info, self.min_samples, self.key = limit, info, min_samples, key
        self.samples = 0
        self.done = [0] * len(PROBLEM_KINDS)  # problems of the epochs finished in this process
        self.base = [0] * len(PROBLEM_KINDS)  # the current epoch's counts when it started (a resume's)
        self.loader = None

    def start_epoch(self, loader) -> None:
        """`loader`: the epoch's LoaderProgress (its counts may start from a checkpoint's)."""
        self.loader, self.base = loader, _total(loader.problems)

    def end_epoch(self) -> None:
        if self.loader is not None:
            self.done = [d + n - b for d, n, b in zip(self.done, _total(self.loader.problems), self.base)]
            self.loader = None

    def add(self, batch) -> None:
        """A trained batch: its valid entries are samples (padding and undecodable images are not)."""
        self.samples += int(batch.valid.sum())

    def counts(self) -> tuple[int, dict[str, int]]:
        """(samples, {kind: problems}) of this process, summed over ranks (a collective)."""
        current = _total(self.loader.problems) if self.loader is not None else self.base
        mine = [d + n - b for d, n, b in zip(self.done, current, self.base)]
        values = torch.tensor([self.samples] + mine, dtype=torch.int64)
        if self.info.distributed:
            values = values.to(self.info.device)
            torch.distributed.all_reduce(values)
        total = values.cpu().tolist()
        return total[0], {k: n for k, n in zip(PROBLEM_KINDS, total[1:]) if k in COUNTED and n}

    def check(self) -> None:
        """ProblemRateExceeded (the same on every rank) past the limit; call it on every rank alike."""
        samples, problems = self.counts()
        n = sum(problems.values())
        if samples + n < self.min_samples or not n:
            return
        rate = n / (samples + n)
        if rate > self.limit:
            kinds = ", ".join(f"{k}={v}" for k, v in problems.items())
            raise ProblemRateExceeded(
                f"data problem rate {rate:.4f} is past {self.key}={self.limit} ({n} problems in {samples + n} "
                f"samples read: {kinds}); repair the shards (python -m shards.validate) or raise {self.key}")
