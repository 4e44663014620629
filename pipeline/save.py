"""Stage 0 of a fine-tune run: a pretrained model saved like a trained stage.

    python -m pipeline.save --model ViT-L-14 --pretrained openai --out runs/r/stage0/model

Loads an open_clip architecture with its pretrained weights (a tag or a file) and writes the
plain open_clip artifact every stage has (pipeline.models.save_model), with the activation
the weights need (QuickGELU for OpenAI's) recorded in its config, so later jobs and compute
nodes read the saved folder instead of a download cache. `OUT/saved.json` (written last)
records the spec: the step is done while it matches.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from common.cli import run_main, setup_logging
from common.io import write_json
from common.spec import fingerprint, from_args, param, parser, result_fields

log = logging.getLogger("pipeline.save")
RECORD_NAME = "saved.json"


@dataclass(frozen=True)
class SaveSpec:
    """A pretrained model saved as a stage model folder."""
    model: str = param(help="open_clip architecture")
    pretrained: str = param(help="pretrained tag or weights file")
    out: str = param(help="the model folder to write", result=False)
    quick_gelu: bool | None = param(None, "QuickGELU activation (default: as the pretrained weights were trained)")


def _saved_alike(spec: SaveSpec) -> bool:
    """The folder holds a saved model of this architecture and config (a folder saved before
    records were kept: its weights stay, so that their fingerprint, and every later step
    made from them, stays valid)."""
    from pipeline import models

    try:
        saved = json.loads((Path(spec.out) / models.CONFIG_NAME).read_text())
        return models.is_saved(spec.out) and saved.get("architecture") == spec.model and \
            saved.get("model_cfg") == models.model_config(spec.model, spec.pretrained, spec.quick_gelu)
    except (OSError, ValueError):
        return False


def is_done(spec: SaveSpec) -> bool:
    """The folder holds a saved model whose record carries this spec (or, without a record,
    one saved alike)."""
    from pipeline import models

    record = Path(spec.out) / RECORD_NAME
    try:
        if record.is_file():
            return models.is_saved(spec.out) and json.loads(record.read_text()).get("fingerprint") == fingerprint(spec)
    except (OSError, ValueError):
        return False
    return _saved_alike(spec)


def save(spec: SaveSpec) -> Path:
    """Write the model folder (unless one saved alike is there), then its record."""
    from pipeline import models

    out = Path(spec.out)
    if not (not (out / RECORD_NAME).is_file() and _saved_alike(spec)):
        (out / RECORD_NAME).unlink(missing_ok=True)  # the record goes first, is written last
        model, *_ = models.create(spec.model, pretrained=spec.pretrained, quick_gelu=spec.quick_gelu)
        models.save_model(model, spec.model, models.model_config(spec.model, spec.pretrained, spec.quick_gelu), out)
    write_json(out / RECORD_NAME, {"spec": result_fields(spec), "fingerprint": fingerprint(spec)})
    log.info("saved %s (%s) into %s", spec.model, spec.pretrained, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    spec = from_args(SaveSpec, parser(SaveSpec, "python -m pipeline.save", __doc__).parse_args(argv))
    setup_logging()
    save(spec)
    return 0


if __name__ == "__main__":
    run_main(main, "python -m pipeline.save")
