"""Creating, locking and saving open_clip models.

Models are open_clip architectures by name, plus the small configs in `configs/models/`
(registered with `open_clip.add_model_config`) that train in minutes on a CPU. The init
is scratch, an open_clip pretrained tag, a checkpoint file, or a saved stage folder.
A saved stage model is a plain open_clip artifact that needs no project code:

    model_dir/open_clip_config.json        {"model_cfg", "preprocess_cfg"}
    model_dir/open_clip_pytorch_model.bin  the state_dict
    model_dir/<arch>.json                  the model config alone

    open_clip.create_model("local-dir:model_dir")
    open_clip.add_model_config("model_dir/<arch>.json")
    open_clip.create_model("<arch>", pretrained="model_dir/open_clip_pytorch_model.bin")
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import open_clip
import torch

from common.io import atomic_path, write_json

log = logging.getLogger("pipeline.models")
MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"
WEIGHTS_NAME = "open_clip_pytorch_model.bin"
_registered = False


def register_project_configs() -> None:
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def known_architecture(arch: str) -> bool:
    register_project_configs()
    return arch in open_clip.list_models()


def create(arch: str, pretrained: str | None = None, precision: str = "fp32", device="cpu",
           lock_image: bool = False, lock_image_unlocked_groups: int = 0,
           lock_text: bool = False, lock_text_unlocked_layers: int = 0):
    """(model, train transform, eval transform, tokenizer) for an architecture and init."""
    register_project_configs()
    if pretrained and os.path.isdir(pretrained):
        model, pre_train, pre_val = open_clip.create_model_and_transforms(
            f"local-dir:{pretrained}", precision=precision, device=device)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{pretrained}")
    else:
        if not known_architecture(arch):
            raise ValueError(f"unknown model architecture {arch!r} (not in open_clip nor {MODEL_CONFIG_DIR})")
        model, pre_train, pre_val = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained or None, precision=precision, device=device)
        tokenizer = open_clip.get_tokenizer(arch)
    if lock_image:
        model.lock_image_tower(unlocked_groups=lock_image_unlocked_groups, freeze_bn_stats=False)
    if lock_text:
        model.lock_text_tower(unlocked_layers=lock_text_unlocked_layers, freeze_layer_norm=True)
    return model, pre_train, pre_val, tokenizer


def model_config(arch: str, pretrained: str | None = None) -> dict:
    if pretrained and os.path.isdir(pretrained):
        return json.loads((Path(pretrained) / "open_clip_config.json").read_text())["model_cfg"]
    register_project_configs()
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"unknown model architecture {arch!r}")
    return cfg


def _fresh_shapes(model_cfg: dict) -> dict:
    with torch.device("meta"):
        model = open_clip.model.CLIP(**model_cfg) if "custom_text" not in model_cfg else \
            open_clip.model.CustomTextCLIP(**model_cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def save_model(model: torch.nn.Module, arch: str, model_cfg: dict, out_dir: str | Path) -> Path:
    """Write the plain open_clip artifact (see the module doc); each file atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    preprocess = open_clip.get_model_preprocess_cfg(model)
    reference = _fresh_shapes(model_cfg)
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
        if k in reference and v.shape != reference[k] and v.numel() == math.prod(reference[k]):
            v = v.reshape(reference[k])  # e.g. a logit_scale made 1-dim for DeepSpeed
        state[k] = v

    with atomic_path(out_dir / WEIGHTS_NAME) as tmp:
        torch.save(state, tmp)
    write_json(out_dir / f"{arch}.json", model_cfg)
    write_json(out_dir / "open_clip_config.json", {"model_cfg": model_cfg, "preprocess_cfg": preprocess,
                                                    "architecture": arch})
    return out_dir
