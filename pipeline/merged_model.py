"""The merged MCL model: every stage's frozen towers behind one open_clip-like interface.

The artifact (written by the `pipeline.merge` job) is one file holding every stage's
open_clip config and weights; it needs no run folder:

    from pipeline.merged_model import load_merged
    model = load_merged("merged.pt")          # .encode_image, .encode_text, .preprocess, .tokenizer
    img = model.encode_image(torch.stack([model.preprocess(pil)]))
    txt = model.encode_text(model.tokenizer(["a photo of a cat"]))

image = normalize(concat_s normalize(f_s(image))), text likewise; without per-stage
normalisation the unnormalised stage features are concatenated (the reference notebook's
way). Stages may differ in image size and normalisation (images are preprocessed for the
first stage and resized / renormalised for the others); they share a tokenizer. Image-only
stages (pipeline.image_model) merge the same way: their backbones' features concatenated,
no text tower, no tokens.
"""
from __future__ import annotations

from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from common.cli import UsageError
from pipeline import image_model

FORMAT = "mcl-merged-v1"


class MergedCLIP(torch.nn.Module):
    """Frozen stage models behind one open_clip-like interface."""

    def __init__(self, models: list, preprocess_cfgs: list[dict], per_stage_norm: bool, names: list[str]):
        super().__init__()
        self.stages = torch.nn.ModuleList(models)
        self.names, self.per_stage_norm = names, per_stage_norm
        self.preprocess_cfgs = preprocess_cfgs
        first = preprocess_cfgs[0]
        self.modality = getattr(models[0], "modality", "clip")
        if self.modality == "image":  # the stages' own eval transform and no tokens
            self.preprocess = image_model.eval_transform(first["size"], first["mean"], first["std"])
            self.tokenizer = image_model.no_tokens
        else:
            self.preprocess = open_clip.image_transform(
                first["size"], is_train=False, mean=first.get("mean"), std=first.get("std"),
                interpolation=first.get("interpolation"), resize_mode=first.get("resize_mode"))
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


def record_path(artifact: str | Path) -> Path:
    """The merge record beside an artifact: its spec and the fingerprints of its stages."""
    return Path(f"{artifact}.json")


def merged_fingerprint(artifact: str | Path) -> str | None:
    """What identifies a merged artifact, from its record (None without one)."""
    import json

    try:
        return json.loads(record_path(artifact).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        return None


def is_merged(blob) -> bool:
    """Whether a loaded object is a merged artifact (of this format)."""
    return isinstance(blob, dict) and blob.get("format") == FORMAT


def load_merged(path: str | Path, device="cpu") -> MergedCLIP:
    """The merged model of an artifact written by `pipeline.merge`."""
    try:
        artifact = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever torch raises, the file is the problem
        raise UsageError(f"{path}: cannot load merged model ({str(exc).splitlines()[0][:200]})") from exc
    if not is_merged(artifact):
        raise UsageError(f"{path}: not a merged MCL model (format {FORMAT})")
    return from_artifact(artifact, device)


def from_artifact(artifact: dict, device="cpu") -> MergedCLIP:
    """The merged model of an artifact already read with torch.load."""
    models, cfgs, names = [], [], []
    for entry in artifact["stages"]:
        model_cfg = dict(entry["model_cfg"])
        if image_model.is_image_config(model_cfg):
            model = image_model.create(model_cfg)
        else:
            cls = open_clip.model.CustomTextCLIP if "hf_model_name" in model_cfg.get("text_cfg", {}) \
                else open_clip.model.CLIP
            model = cls(**model_cfg)
        state = {k: v.reshape(model.state_dict()[k].shape) if k in model.state_dict() else v
                 for k, v in entry["state_dict"].items()}
        model.load_state_dict(state)
        models.append(model.to(device).eval())
        size = model_cfg["image_size"] if image_model.is_image_config(model_cfg) else \
            model_cfg["vision_cfg"]["image_size"]
        pre = {"size": size, **entry.get("preprocess_cfg", {})}
        pre.setdefault("mean", open_clip.constants.OPENAI_DATASET_MEAN)
        pre.setdefault("std", open_clip.constants.OPENAI_DATASET_STD)
        cfgs.append(pre)
        names.append(entry["name"])
    return MergedCLIP(models, cfgs, bool(artifact["per_stage_norm"]), names)
