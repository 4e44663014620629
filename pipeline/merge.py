"""Merge the frozen towers of all stages into one model (the MCL representation).

    python -m pipeline.merge --stage runs/r/stage0/model --stage runs/r/stage1/model ... --out runs/r/merged.pt

image = normalize(concat_s normalize(f_s(image))), text likewise. `--no-per-stage-norm`
concatenates the unnormalised features instead, as the reference notebook does. The
artifact is one file holding every stage's open_clip config and weights; it needs no run
folder. `pipeline.merged.load_merged` (or `pipeline.models.load`) loads it:

    from pipeline.merged import load_merged
    model = load_merged("merged.pt")          # .encode_image, .encode_text, .preprocess, .tokenizer

Stages may differ in image size and normalisation; they must share a tokenizer.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from common.cli import ArgumentParser, UsageError, run_main, setup_logging
from common.io import atomic_path
from pipeline import models
from pipeline.merged import FORMAT

log = logging.getLogger("pipeline.merge")


def _stage_entry(model_dir: Path, name: str) -> dict:
    cfg_path, weights = model_dir / models.CONFIG_NAME, model_dir / models.WEIGHTS_NAME
    if not models.is_saved(model_dir):
        raise UsageError(f"{model_dir}: not a stage model folder (needs {models.CONFIG_NAME} and "
                         f"{models.WEIGHTS_NAME})")
    cfg = json.loads(cfg_path.read_text())
    state = torch.load(weights, map_location="cpu", weights_only=True)
    return {"name": name, "model_cfg": cfg["model_cfg"], "preprocess_cfg": cfg.get("preprocess_cfg", {}),
            "state_dict": state}


def is_done(stage_dirs: Sequence[str | Path], out: str | Path) -> bool:
    """The artifact exists and is newer than every stage model's weights."""
    out = Path(out)
    weights = [Path(d) / models.WEIGHTS_NAME for d in stage_dirs]
    return out.is_file() and all(w.is_file() and out.stat().st_mtime >= w.stat().st_mtime for w in weights)


def merge(stage_dirs: Sequence[str | Path], out: str | Path, names: Sequence[str] | None = None,
          per_stage_norm: bool = True) -> Path:
    """Write the merged artifact from saved stage model folders, in order."""
    if not stage_dirs:
        raise UsageError("merge needs at least one --stage")
    names = list(names) if names else [Path(d).parent.name if Path(d).name == "model" else Path(d).name
                                       for d in stage_dirs]
    entries = [_stage_entry(Path(d), n) for d, n in zip(stage_dirs, names)]
    text_cfgs = {json.dumps({k: e["model_cfg"]["text_cfg"].get(k) for k in ("context_length", "vocab_size",
                                                                            "hf_tokenizer_name")})
                 for e in entries}
    if len(text_cfgs) > 1:
        raise UsageError(f"stages use different tokenizers / context lengths: {sorted(text_cfgs)}")
    artifact = {"format": FORMAT, "per_stage_norm": per_stage_norm, "stages": entries}
    out = Path(out)
    with atomic_path(out) as tmp:
        torch.save(artifact, tmp)
    log.info("merged %d stages (%s) into %s", len(entries), ", ".join(names), out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m pipeline.merge", description=__doc__)
    p.add_argument("--stage", action="append", required=True, metavar="MODEL_DIR",
                   help="a stage's saved model folder; repeat, in stage order")
    p.add_argument("--name", action="append", help="a name per stage (default: the stage folder's)")
    p.add_argument("--out", required=True, help="the merged artifact file")
    p.add_argument("--no-per-stage-norm", action="store_true",
                   help="concatenate unnormalised stage features (the reference notebook's way)")
    args = p.parse_args(argv)
    setup_logging()
    if args.name and len(args.name) != len(args.stage):
        raise UsageError("--name must be given once per --stage")
    merge(args.stage, args.out, args.name, per_stage_norm=not args.no_per_stage_norm)
    return 0


if __name__ == "__main__":
    run_main(main, "python -m pipeline.merge")
