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
effective_negatives, epoch), loader/<counter> at the end of each epoch (pure, mixed and
early batches, fallback samples, data problems skipped). A tracker never stops training:
a W&B that cannot be reached (or is not logged in) is reported in one warning and left out;
a package that is missing is a configuration error before training starts.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

log = logging.getLogger("pipeline.train")
KNOWN = ("tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def tracker_names(report_to: list[str] | str) -> list[str]:
    """`report_to` as a list of names: ["tensorboard", "wandb"] from either form."""
    items = report_to.split(",") if isinstance(report_to, str) else report_to
    return [name.strip() for name in items if name and name.strip()]


def check(report_to: list[str] | str) -> list[str]:
    """Problems with `report_to` (unknown names), each naming the key."""
    return [f"report_to: unknown tracker {name!r} (one of {', '.join(KNOWN)})"
            for name in tracker_names(report_to) if name not in KNOWN]


def missing_packages(report_to: list[str] | str) -> list[str]:
    """The trackers of `report_to` whose package is not installed."""
    import importlib.util

    return [name for name in tracker_names(report_to) if importlib.util.find_spec(PACKAGES[name]) is None]


class TensorBoardTracker:
    def __init__(self, out: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops the events of an earlier session from the step this one redoes
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
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
            settings=wandb.Settings(silent=True, console="off"))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers of one stage's main rank; every call is safe when there are none."""

    def __init__(self, names: list[str], out: Path, start_step: int, config: dict,
                 wandb_project: str | None = None, wandb_entity: str | None = None):
        self.active: dict = {}
        if "tensorboard" in names:
            self.active["tensorboard"] = TensorBoardTracker(out, start_step)
        if "wandb" in names:
            (out / "wandb").mkdir(parents=True, exist_ok=True)
            try:
                self.active["wandb"] = WandbTracker(out, config, wandb_project, wandb_entity)
            except Exception as exc:  # noqa: BLE001 - unreachable, not logged in, ...: train without it
                log.warning("report_to: W&B left out, training goes on without it: %s",
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, tracker in list(self.active.items()):
            try:
                tracker.log(scalars, step)
            except Exception as exc:  # noqa: BLE001
                log.warning("report_to: %s left out after an error: %s", name, exc)
                del self.active[name]

    def close(self) -> None:
        for name, tracker in self.active.items():
            try:
                tracker.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("report_to: closing %s: %s", name, exc)
        self.active = {}
