"""Training dashboards: TensorBoard and Weights & Biases, as open_clip_train's `--report-to`.

A stage's `report_to` (a list, or a comma-separated string: `tensorboard,wandb`) names the
trackers its main rank writes to, besides metrics.jsonl:

    tensorboard  event files in <stage>/tensorboard, so `tensorboard --logdir <run_dir>` shows
                 one run per stage; a resumed stage purges the steps it redoes
    wandb        one W&B run per stage, grouped by the run folder (group = the run folder's
                 name, run name = the stage folder's name), files in <stage>/wandb; the run id
                 follows the stage folder, so a resumed (requeued) stage continues its W&B run.
                 `WANDB_MODE=offline` writes the run to disk for `wandb sync`; project and
                 entity from `wandb_project` / `wandb_entity` (or WANDB_PROJECT / WANDB_ENTITY)

Scalars: train/<key> for each step's record (loss, lr, logit_scale, samples_per_s,
effective_negatives, epoch; at log steps data_wait_share, samples_per_s_per_device and mfu
where known: pipeline.trainer.throughput), loader/<counter> at the end of each epoch (pure, mixed and
early batches, fallback samples, data problems skipped). A tracker never stops training:
one that cannot start (a W&B that cannot be reached or is not logged in: after
WANDB_INIT_TIMEOUT, 90 s by default, or a 30 s login prompt) is reported in one warning and
left out, and W&B's uploads get at most 2 minutes at the end; a crashed stage's W&B run is
marked failed. A package that is missing is a configuration error before training starts.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

from common.imports import allow_import

log = logging.getLogger("pipeline.train")
KNOWN = ("tensorboard", "wandb")
LABELS = {"tensorboard": "TensorBoard", "wandb": "W&B"}
LOGIN_TIMEOUT_S = 30     # a terminal's login prompt left unanswered
FINISH_TIMEOUT_S = 120   # uploads still pending when the stage ends


def tracker_names(report_to: list[str] | str) -> list[str]:
    """`report_to` as a list of names: ["tensorboard", "wandb"] from either form."""
    items = report_to.split(",") if isinstance(report_to, str) else report_to
    return [name.strip() for name in items if name and name.strip()]


def check(report_to: list[str] | str) -> list[str]:
    """Problems with `report_to` (unknown names), each naming the key."""
    return [f"report_to: unknown tracker {name!r} (one of {', '.join(KNOWN)})"
            for name in tracker_names(report_to) if name not in KNOWN]


def missing_packages(report_to: list[str] | str) -> list[str]:
    """The trackers of `report_to` whose package (of the same name) is not installed; their
    import is allowed again (pipeline/__init__ keeps wandb out of processes that do not use it)."""
    import importlib.util

    names = tracker_names(report_to)
    for name in names:
        allow_import(name)
    return [name for name in names if importlib.util.find_spec(name) is None]


class TensorBoardTracker:
    def __init__(self, out: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops the events of an earlier session from the step this one redoes
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, out: Path, config: dict, project: str | None, entity: str | None):
        import wandb

        out = out.resolve()
        digest = hashlib.blake2b(str(out).encode(), digest_size=6).hexdigest()
        run_id = re.sub(r"[^A-Za-z0-9_-]", "-", f"{out.parent.name}-{out.name}")[-48:] + "-" + digest
        self.run = wandb.init(
            project=project or os.environ.get("WANDB_PROJECT") or "mcl", entity=entity,
            group=out.parent.name, name=out.name, job_type="train", id=run_id,
            resume="allow", dir=str(out), config=config,
            # never wait on W&B for good: a login prompt or an upload that cannot finish
            settings=wandb.Settings(silent=True, console="off", login_timeout=LOGIN_TIMEOUT_S,
                                    finish_timeout=FINISH_TIMEOUT_S))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Trackers:
    """The trackers of one stage's main rank; every call is safe when there are none."""

    def __init__(self, names: list[str], out: Path, start_step: int, config: dict,
                 wandb_project: str | None = None, wandb_entity: str | None = None):
        self.active: dict = {}
        makers = {"tensorboard": lambda: TensorBoardTracker(out, start_step),
                  "wandb": lambda: WandbTracker(out, config, wandb_project, wandb_entity)}
        for name in names:
            try:
                self.active[name] = makers[name]()
            except Exception as exc:  # noqa: BLE001 - unreachable, not logged in, a folder it cannot write...
                log.warning("report_to: %s left out, training goes on without it: %s", LABELS[name],
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, tracker in list(self.active.items()):
            try:
                tracker.log(scalars, step)
            except Exception as exc:  # noqa: BLE001
                log.warning("report_to: %s left out after an error: %s", name, exc)
                del self.active[name]

    def close(self, failed: bool = False) -> None:
        """End every tracker (`failed`: training stopped on an error, W&B marks the run failed)."""
        for name, tracker in self.active.items():
            try:
                tracker.close(failed)
            except Exception as exc:  # noqa: BLE001
                log.warning("report_to: closing %s: %s", name, exc)
        self.active = {}
