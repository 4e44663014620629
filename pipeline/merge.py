"""Merge the frozen towers of all stages into one model (the MCL representation).

    python -m pipeline.merge --stages runs/r/stage0/model runs/r/stage1/model ... --out runs/r/merged.pt

image = normalize(concat_s normalize(f_s(image))), text likewise. `--no-per-stage-norm`
concatenates the unnormalised features instead, as the reference notebook does. The
artifact is one file holding every stage's open_clip config and weights; it needs no run
folder. Beside it, `OUT.json` (written last) records the spec and the fingerprints of the
stage models it was made from: the merge is done while they match. `pipeline.merged_model.load_merged` (or `pipeline.models.load`) loads it:

    from pipeline.merged_model import load_merged
    model = load_merged("merged.pt")          # .encode_image, .encode_text, .preprocess, .tokenizer

Stages may differ in image size and normalisation; they must share a tokenizer.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from dataclasses import dataclass
from typing import Sequence

import torch

from common.cli import UsageError, run_main, setup_logging
from common.io import atomic_path, write_json
from common.spec import fingerprint, from_args, param, parser, result_fields
from pipeline import image_model, models
from pipeline.merged_model import FORMAT, record_path

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


@dataclass(frozen=True)
class MergeSpec:
    """The merged model of some stage models."""
    stages: tuple[str, ...] = param(help="the stages' saved model folders, in stage order", result=False)
    out: str = param(help="the merged artifact file", result=False)
    names: tuple[str, ...] = param((), "a name per stage (default: the stage folder's)")
    per_stage_norm: bool = param(True, "normalise each stage's features before concatenating (off: the "
                                       "reference notebook's unnormalised concatenation)")


def _inputs(spec: MergeSpec) -> dict:
    return {"stages": [models.model_fingerprint(str(d), None, "both") for d in spec.stages]}


def is_done(spec: MergeSpec) -> bool:
    """The artifact exists and its record carries this spec and these stage models."""
    record = record_path(spec.out)
    try:
        return Path(spec.out).is_file() and \
            json.loads(record.read_text()).get("fingerprint") == fingerprint(spec, **_inputs(spec))
    except (OSError, ValueError):
        return False


def merge(spec: MergeSpec) -> Path:
    """Write the merged artifact from saved stage model folders, in order, then its record."""
    stage_dirs = spec.stages
    if not stage_dirs:
        raise UsageError("merge needs at least one stage (--stages)")
    if spec.names and len(spec.names) != len(stage_dirs):
        raise UsageError("--names must give one name per stage")
    names = list(spec.names) or [Path(d).parent.name if Path(d).name == "model" else Path(d).name
                                 for d in stage_dirs]
    entries = [_stage_entry(Path(d), n) for d, n in zip(stage_dirs, names)]
    kinds = {image_model.is_image_config(e["model_cfg"]) for e in entries}
    if len(kinds) > 1:
        raise UsageError("stages mix image-only and CLIP models: merge one kind")
    text_cfgs = {json.dumps({k: e["model_cfg"].get("text_cfg", {}).get(k)
                             for k in ("context_length", "vocab_size", "hf_tokenizer_name")}) for e in entries}
    if len(text_cfgs) > 1:
        raise UsageError(f"stages use different tokenizers / context lengths: {sorted(text_cfgs)}")
    artifact = {"format": FORMAT, "per_stage_norm": spec.per_stage_norm, "stages": entries}
    out = Path(spec.out)
    record_path(out).unlink(missing_ok=True)  # the record goes first, is written last
    with atomic_path(out) as tmp:
        torch.save(artifact, tmp)
    inputs = _inputs(spec)
    write_json(record_path(out), {"spec": result_fields(spec), "inputs": inputs,
                                  "fingerprint": fingerprint(spec, **inputs)})
    log.info("merged %d stages (%s) into %s", len(entries), ", ".join(names), out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    spec = from_args(MergeSpec, parser(MergeSpec, "python -m pipeline.merge", __doc__).parse_args(argv))
    setup_logging()
    merge(spec)
    return 0


if __name__ == "__main__":
    run_main(main, "python -m pipeline.merge")
