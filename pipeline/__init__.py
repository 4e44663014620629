"""The stage jobs of an MCL run and the library they share (README.md, Layout)."""
from common.imports import skip_optional_import

skip_optional_import("wandb")  # timm imports it with open_clip; only report_to=wandb needs it (pipeline.trainer.trackers)
