"""Merge the frozen towers of all stages into one model (the MCL representation).

    python -m pipeline.merge --stage runs/r/stage0/model --stage runs/r/stage1/model ... --out runs/r/merged.pt

image = normalize(concat_s normalize(f_s(image))), text likewise. `--no-per-stage-norm`
concatenates the unnormalised features instead, as the reference notebook does. The
artifact is one file holding every stage's open_clip config and weights; it needs no run
folder:

    from pipeline.merge import load_merged
    model = load_merged("merged.pt")          # .encode_image, .encode_text, .preprocess, .tokenizer
    img = model.encode_image(torch.stack([model.preprocess(pil)]))
    txt = model.encode_text(model.tokenizer(["a photo of a cat"]))

Stages may differ in image size and normalisation (images are preprocessed for the
first stage and resized / renormalised for the others); they must share a tokenizer.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F

from common.cli import ArgumentParser, UsageError, run_main, setup_logging
from common.io import atomic_path

log = logging.getLogger("pipeline.merge")
FORMAT = "mcl-merged-v1"


def _stage_entry(model_dir: Path, name: str) -> dict:
    cfg_path = model_dir / "open_clip_config.json"
    weights = model_dir / "open_clip_pytorch_model.bin"
    if not cfg_path.is_file() or not weights.is_file():
        raise UsageError(f"{model_dir}: not a stage model folder (needs open_clip_config.json and "
                         "open_clip_pytorch_model.bin)")
    cfg = json.loads(cfg_path.read_text())
    state = torch.load(weights, map_location="cpu", weights_only=True)
    return {"name": name, "model_cfg": cfg["model_cfg"], "preprocess_cfg": cfg.get("preprocess_cfg", {}),
            "state_dict": state}


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


class MergedCLIP(torch.nn.Module):
    """Frozen stage models behind one open_clip-like interface."""

    def __init__(self, models: list, preprocess_cfgs: list[dict], per_stage_norm: bool, names: list[str]):
        super().__init__()
        self.stages = torch.nn.ModuleList(models)
        self.names, self.per_stage_norm = names, per_stage_norm
        self.preprocess_cfgs = preprocess_cfgs
        self.preprocess = open_clip.image_transform(
            preprocess_cfgs[0]["size"], is_train=False, mean=preprocess_cfgs[0].get("mean"),
            std=preprocess_cfgs[0].get("std"), interpolation=preprocess_cfgs[0].get("interpolation"),
            resize_mode=preprocess_cfgs[0].get("resize_mode"))
        self.tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=models[0].context_length) \
            if hasattr(models[0], "context_length") else open_clip.get_tokenizer("ViT-B-32")
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def _stage_input(self, images: torch.Tensor, i: int) -> torch.Tensor:
        first, cfg = self.preprocess_cfgs[0], self.preprocess_cfgs[i]
        size = cfg["size"] if isinstance(cfg["size"], (list, tuple)) else (cfg["size"], cfg["size"])
        x = images
        if tuple(cfg.get("mean", ())) != tuple(first.get("mean", ())) or \
                tuple(cfg.get("std", ())) != tuple(first.get("std", ())):
            m0, s0 = torch.tensor(first["mean"]).view(1, 3, 1, 1), torch.tensor(first["std"]).view(1, 3, 1, 1)
            m1, s1 = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
            x = (x * s0.to(x) + m0.to(x) - m1.to(x)) / s1.to(x)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bicubic", align_corners=False, antialias=True)
        return x

    def _combine(self, feats: list[torch.Tensor], normalize: bool) -> torch.Tensor:
        if self.per_stage_norm:
            feats = [F.normalize(f.float(), dim=-1) for f in feats]
        out = torch.cat([f.float() for f in feats], dim=-1)
        return F.normalize(out, dim=-1) if normalize else out

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self._combine([m.encode_image(self._stage_input(images, i)) for i, m in enumerate(self.stages)],
                             normalize)

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self._combine([m.encode_text(tokens) for m in self.stages], normalize)

    def encode_stage_image(self, images: torch.Tensor, i: int) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(self.stages[i].encode_image(self._stage_input(images, i)).float(), dim=-1)

    def encode_stage_text(self, tokens: torch.Tensor, i: int) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(self.stages[i].encode_text(tokens).float(), dim=-1)


def load_merged(path: str | Path, device="cpu") -> MergedCLIP:
    """The merged model of an artifact written by `merge`."""
    try:
        artifact = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever torch raises, the file is the problem
        raise UsageError(f"{path}: cannot load merged model ({str(exc).splitlines()[0][:200]})") from exc
    if not isinstance(artifact, dict) or artifact.get("format") != FORMAT:
        raise UsageError(f"{path}: not a merged MCL model (format {FORMAT})")
    models, cfgs, names = [], [], []
    for entry in artifact["stages"]:
        model_cfg = dict(entry["model_cfg"])
        cls = open_clip.model.CustomTextCLIP if "hf_model_name" in model_cfg.get("text_cfg", {}) \
            else open_clip.model.CLIP
        model = cls(**model_cfg)
        state = {k: v.reshape(model.state_dict()[k].shape) if k in model.state_dict() else v
                 for k, v in entry["state_dict"].items()}
        model.load_state_dict(state)
        models.append(model.to(device).eval())
        pre = {"size": model_cfg["vision_cfg"]["image_size"], **entry.get("preprocess_cfg", {})}
        pre.setdefault("mean", open_clip.constants.OPENAI_DATASET_MEAN)
        pre.setdefault("std", open_clip.constants.OPENAI_DATASET_STD)
        cfgs.append(pre)
        names.append(entry["name"])
    return MergedCLIP(models, cfgs, bool(artifact["per_stage_norm"]), names)


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
