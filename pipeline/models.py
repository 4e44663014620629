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

Image-only architectures (`"modality": "image"` in their config: pipeline.image_model,
SimCLR backbones from timm or torchvision) go through the same functions: their saved
folder has the same two files, and their tokenizer gives no tokens.

`load(spec)` is the one way from a model spec to a ready model (every job that reads a
model uses it): a saved stage folder, a training checkpoint (`checkpoints/step_N.pt`), a
merged MCL artifact (`.pt` from pipeline.merge, see pipeline.merged_model), or an open_clip
architecture with an optional pretrained tag or file (`ARCH:TAG`, or `load(ARCH, TAG)`).
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Callable, NamedTuple

import open_clip
import torch

from common.cli import UsageError
from common.io import atomic_path, write_json
from pipeline import image_model
from pipeline import merged_model as merged
from pipeline.artifacts import file_fingerprint

log = logging.getLogger("pipeline.models")
MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"
WEIGHTS_NAME = "open_clip_pytorch_model.bin"
CONFIG_NAME = "open_clip_config.json"
_registered = False


def register_project_configs() -> None:
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def known_architecture(arch: str) -> bool:
    register_project_configs()
    return arch in open_clip.list_models() or arch in image_model.architectures()


def saved_config(folder: str | os.PathLike) -> dict | None:
    """The model config of a saved stage folder (None when it has none)."""
    path = Path(folder) / CONFIG_NAME
    return json.loads(path.read_text())["model_cfg"] if path.is_file() else None


def is_image_only(arch: str, pretrained: str | None = None) -> bool:
    """Whether the architecture (or the saved folder it starts from) is an image-only model."""
    if pretrained and os.path.isdir(pretrained):
        return image_model.is_image_config(saved_config(pretrained))
    return arch in image_model.architectures()


def _create_image_only(arch: str, pretrained: str | None, device):
    folder = pretrained if pretrained and os.path.isdir(pretrained) else None
    cfg = saved_config(folder) if folder else image_model.architectures()[arch]
    image_model.check_config(cfg, folder or arch)
    model = image_model.create(cfg)
    if pretrained:
        weights = Path(folder) / WEIGHTS_NAME if folder else Path(pretrained)
        if not weights.is_file():
            raise UsageError(f"{pretrained}: no such weights file (an image-only model starts from scratch, a "
                             f"saved stage folder or a state_dict file; nothing is downloaded)")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        whole = any(k.startswith("backbone.") for k in state)
        target = model if whole else model.backbone  # a whole model's weights, or a backbone's alone
        missing, unexpected = target.load_state_dict(state, strict=False)
        if missing:
            raise UsageError(f"{pretrained}: not weights of this backbone: {len(missing)} of its tensors missing "
                             f"(e.g. {missing[0]})")
        if unexpected:  # a classifier's head of a stock checkpoint (fc, classifier, head): the backbone has none
            log.info("%s: %d tensors not in the model ignored (e.g. %s)", pretrained, len(unexpected), unexpected[0])
    return model.to(device), None, image_model.eval_transform(**image_model.preprocess_cfg(cfg)), image_model.no_tokens


def quick_gelu_for(arch: str, pretrained: str | None, quick_gelu: bool | None = None) -> bool:
    """Whether the model needs QuickGELU: `quick_gelu` when given; else what the pretrained tag
    was trained with (OpenAI's weights: yes, as open_clip's own `-quickgelu` configs say);
    a saved stage folder: what it was saved with; else the architecture's config."""
    if quick_gelu is not None:
        return quick_gelu
    register_project_configs()
    if pretrained and os.path.isdir(pretrained) and (Path(pretrained) / CONFIG_NAME).is_file():
        return bool(model_config(arch, pretrained).get("quick_gelu", False))  # as the saved stage was built
    if pretrained and not os.path.exists(pretrained):
        tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
        if tag_cfg:
            return bool(tag_cfg.get("quick_gelu", False))
    return bool((open_clip.get_model_config(arch) or {}).get("quick_gelu", False))


def create(arch: str, pretrained: str | None = None, precision: str = "fp32", device="cpu",
           lock_image: bool = False, lock_image_unlocked_groups: int = 0,
           lock_text: bool = False, lock_text_unlocked_layers: int = 0, quick_gelu: bool | None = None):
    """(model, train transform, eval transform, tokenizer) for an architecture and init. A saved
    stage folder rebuilds the activation it was saved with; otherwise see `quick_gelu_for`.
    An image-only model has no train transform (pipeline.loader.views makes its views)."""
    register_project_configs()
    if is_image_only(arch, pretrained):
        return _create_image_only(arch, pretrained, device)
    if pretrained and os.path.isdir(pretrained):
        model, pre_train, pre_val = open_clip.create_model_and_transforms(
            f"local-dir:{pretrained}", precision=precision, device=device)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{pretrained}")
    else:
        if not known_architecture(arch):
            raise ValueError(f"unknown model architecture {arch!r} (not in open_clip nor {MODEL_CONFIG_DIR})")
        gelu = quick_gelu_for(arch, pretrained, quick_gelu)
        model, pre_train, pre_val = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained or None, precision=precision, device=device, force_quick_gelu=gelu,
            quick_gelu=gelu)
        tokenizer = open_clip.get_tokenizer(arch)
    if lock_image:
        model.lock_image_tower(unlocked_groups=lock_image_unlocked_groups, freeze_bn_stats=False)
    if lock_text:
        model.lock_text_tower(unlocked_layers=lock_text_unlocked_layers, freeze_layer_norm=True)
    return model, pre_train, pre_val, tokenizer


def model_config(arch: str, pretrained: str | None = None, quick_gelu: bool | None = None) -> dict:
    """The open_clip model config a stage is saved with (its activation recorded)."""
    if pretrained and os.path.isdir(pretrained):
        return saved_config(pretrained)
    if arch in image_model.architectures():
        return dict(image_model.architectures()[arch])
    register_project_configs()
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"unknown model architecture {arch!r}")
    return {**cfg, "quick_gelu": quick_gelu_for(arch, pretrained, quick_gelu)}


def _fresh_shapes(model_cfg: dict) -> dict:
    with torch.device("meta"):
        model = open_clip.model.CLIP(**model_cfg) if "custom_text" not in model_cfg else \
            open_clip.model.CustomTextCLIP(**model_cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def is_saved(model_dir: str | Path) -> bool:
    """`model_dir` holds a complete saved model (save_model writes the config last)."""
    return (Path(model_dir) / WEIGHTS_NAME).is_file() and (Path(model_dir) / CONFIG_NAME).is_file()


def save_model(model: torch.nn.Module, arch: str, model_cfg: dict, out_dir: str | Path) -> Path:
    """Write the plain open_clip artifact (see the module doc); each file atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_only = image_model.is_image_config(model_cfg)
    preprocess = image_model.preprocess_cfg(model_cfg) if image_only else open_clip.get_model_preprocess_cfg(model)
    reference = {} if image_only else _fresh_shapes(model_cfg)
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
        if k in reference and v.shape != reference[k] and v.numel() == math.prod(reference[k]):
            v = v.reshape(reference[k])  # e.g. a logit_scale made 1-dim for DeepSpeed
        state[k] = v

    with atomic_path(out_dir / WEIGHTS_NAME) as tmp:
        torch.save(state, tmp)
    write_json(out_dir / f"{arch}.json", model_cfg)
    write_json(out_dir / CONFIG_NAME, {"model_cfg": model_cfg, "preprocess_cfg": preprocess,
                                                    "architecture": arch})
    return out_dir


# --- loading a model from its spec --------------------------------------------------------


class Loaded(NamedTuple):
    """A model ready for inference: eval mode, on its device, with its eval preprocess
    (PIL image -> tensor) and its tokenizer (list of str -> token tensor)."""
    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable


def load(spec: str | os.PathLike, pretrained: str | None = None, device="cpu") -> Loaded:
    """The model of a spec: a saved stage model folder; a training checkpoint or a merged
    MCL artifact (a `.pt` file); or an open_clip architecture, with a pretrained tag or file
    either after a colon (`ARCH:TAG`) or as `pretrained` (then `spec` is the architecture
    alone; a folder ignores it). Raises UsageError, one line naming the spec, when the spec
    does not load."""
    spec = str(spec)
    try:
        if spec.endswith(".pt") and os.path.isfile(spec):
            blob = torch.load(spec, map_location="cpu", weights_only=True)
            if merged.is_merged(blob):
                model = merged.from_artifact(blob, device)
                return Loaded(model, model.preprocess, model.tokenizer)
            if isinstance(blob, dict) and "state_dict" in blob and "name" in blob:  # a training checkpoint
                trained = blob.get("config") or {}
                gelu = None if is_image_only(blob["name"]) else quick_gelu_for(
                    blob["name"], trained.get("pretrained"), trained.get("quick_gelu"))
                model, _, pre, tok = create(blob["name"], device=device, quick_gelu=gelu)
                model.load_state_dict({k: v.reshape(model.state_dict()[k].shape)
                                       for k, v in blob["state_dict"].items()})
                return Loaded(model.eval(), pre, tok)
            raise UsageError(f"{spec}: neither a merged MCL model nor a training checkpoint")
        if os.path.isdir(spec):
            model, _, pre, tok = create("", pretrained=spec, device=device)
        else:
            arch, tag = (spec, pretrained) if pretrained else spec.partition(":")[::2]
            if not known_architecture(arch):
                raise UsageError(f"model {spec!r}: not a merged .pt file, a model folder, or an open_clip architecture")
            model, _, pre, tok = create(arch, pretrained=tag or None, device=device)
        return Loaded(model.eval(), pre, tok)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - a model that does not load is the user's input problem
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"model {spec!r} does not load: {first[:200]}") from exc


def model_fingerprint(model_ref: str, pretrained: str | None, tower: str) -> str:
    """What identifies the features a model spec gives for a tower: a folder's weights file
    hashed; otherwise the spec itself."""
    if os.path.isdir(model_ref):
        config = (Path(model_ref) / CONFIG_NAME).read_text()  # the architecture (QuickGELU or not) counts too
        return file_fingerprint(Path(model_ref) / WEIGHTS_NAME, extra=f"tower={tower};{config}")
    return f"{model_ref}:{pretrained}:{tower}"
