"""A stage's checkpoints: `step_NNNNNNNN` records in `out/checkpoints`, the newest `keep` kept.

The engine writes and reads the model and optimizer (pipeline.trainer.engine); a checkpoint also
holds what an exact resume needs:

    step, epoch      where the run stands
    name, config     the architecture and the whole TrainConfig
    workers          DataLoader workers per rank when it was written
    positions        per rank, {worker: batches consumed this epoch}
    loader           per rank, {worker: its loader counters this epoch} (pipeline.loader.progress.LoaderProgress)
    data_problems    {kind: count}, the most of any finished epoch
    rng              per rank, torch's CPU RNG state
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.trainer.distributed import DistInfo, all_gather_object, barrier
from pipeline.trainer.engine import Engine
from pipeline.trainer.config import TrainConfig, batching, to_dict

log = logging.getLogger("pipeline.train")  # its lines belong to the training log


@dataclass
class Position:
    """Where a run starts: its step, its epoch, and this rank's workers' batches consumed in it
    and counters so far (LoaderProgress.counters)."""
    step: int = 0
    epoch: int = 0
    workers: dict[int, int] = field(default_factory=dict)
    counters: dict[int, dict] = field(default_factory=dict)
    data_problems: dict[str, int] = field(default_factory=dict)


class Checkpoints:
    """The checkpoints of one run, written and read through its engine."""

    def __init__(self, folder: Path, engine: Engine, cfg: TrainConfig, info: DistInfo):
        self.folder, self.engine, self.cfg, self.info = folder, engine, cfg, info

    def _records(self) -> list[Path]:
        return sorted(self.folder.glob(self.engine.record_glob))

    def latest(self) -> Path | None:
        records = self._records()
        return records[-1] if records else None

    def save(self, step: int, epoch: int, positions: dict[int, int], counters: dict[int, dict],
             data_problems: dict[str, int]) -> None:
        """Checkpoint `step` (every rank calls this, with its own workers' positions and counters)."""
        cfg, info = self.cfg, self.info
        state = {"step": step, "epoch": epoch, "name": cfg.model, "config": to_dict(cfg), "batching": batching(cfg),
                 "workers": cfg.workers, "data_problems": dict(data_problems),
                 "positions": [{str(k): int(v) for k, v in p.items()} for p in all_gather_object(positions, info)],
                 "loader": [{str(k): c for k, c in p.items()} for p in all_gather_object(counters, info)],
                 "rng": all_gather_object(torch.get_rng_state(), info)}
        self.engine.save(self.folder, f"step_{step:08d}", state)
        barrier(info)
        if info.is_main:
            for old in self._records()[: -self.cfg.keep_checkpoints]:
                self.engine.remove(self.folder, old.stem)

    def load(self, record: Path) -> dict:
        """Load checkpoint `record` into the engine; returns its state."""
        return self.engine.load(self.folder, record.stem)

    def restore(self, state: dict) -> Position:
        """Restore this rank's RNG from a loaded `state`; the position to start from. The
        workers' positions hold only for the same world size and workers per rank."""
        rank = self.info.rank
        torch.set_rng_state(state["rng"][min(rank, len(state["rng"]) - 1)])
        at = Position(int(state["step"]), int(state["epoch"]),
                      data_problems={k: int(n) for k, n in state.get("data_problems", {}).items()})
        positions = state["positions"]
        if len(positions) == self.info.world_size and state["workers"] == self.cfg.workers:
            at.workers = {int(w): int(n) for w, n in positions[rank].items()}
            at.counters = {int(w): c for w, c in state.get("loader", [{}] * len(positions))[rank].items()}
        else:
            log.warning("world size or workers changed: epoch %d restarts from its first batch", at.epoch)
        return at
