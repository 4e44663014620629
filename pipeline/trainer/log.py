"""What a training run reports: each step's metrics and log line, each epoch's loader counters.

    metrics.jsonl        one line per step (rank 0), trimmed back to the resumed step on a
                         resume; mirrored to the config's `report_to` trackers (pipeline.trainer.trackers);
                         log steps add data_wait_share, samples_per_s_per_device and mfu
                         (pipeline.trainer.throughput)
    loader_stats.jsonl   one line per epoch of the cluster-bucketed loader
                         (pipeline.loader.progress)
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

import torch

from common.io import atomic_output
from pipeline.trainer.distributed import DistInfo
from pipeline.trainer.trackers import Trackers

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
             logit_scale: torch.Tensor, label: int | None = None, throughput=None) -> None:
        """Record step `step` (just taken); `logit_scale` is the model's log-scale parameter,
        `label` the pseudo-label most of this rank's batch carried (None: unlabelled);
        `throughput` (pipeline.trainer.throughput.Throughput) adds its figures since the last
        log step to the records of log steps."""
        elapsed = time.time() - self.t_start
        sps = (step - self.start_step) * self.samples_per_step / max(elapsed, 1e-9)
        self.last = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": lr, "samples_per_s": sps,
                     "effective_negatives": effective_negatives, "logit_scale": logit_scale.exp().item(),
                     "time": time.time()}
        if label is not None:
            self.last["label"] = label
        logged = step % self.log_every == 0 or step == self.total_steps
        if throughput is not None and logged:
            self.last.update(throughput.take_window())
        self._write(self.last)
        if self.enabled and logged:
            eta = (self.total_steps - step) * elapsed / max(step - self.start_step, 1)
            seen = ""
            if "data_wait_share" in self.last:
                seen = f" data wait {100 * self.last['data_wait_share']:.0f}%"
                if self.last.get("mfu") is not None:
                    seen += f" mfu {100 * self.last['mfu']:.1f}%"
            log.info("step %d/%d epoch %d loss %.4f lr %.2e %.1f samples/s eta %s eff_neg %.1f scale %.1f%s",
                     step, self.total_steps, epoch, self.last["loss"], lr, sps, _hms(eta),
                     effective_negatives, self.last["logit_scale"], seen)

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


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
