"""Image-only contrastive models (SimCLR): a timm or torchvision backbone and a projection head.

The unimodal half of MCL (the paper's SimCLR / ResNet-18 experiments) trains these with
the masked NT-Xent loss (pipeline.trainer.ntxent) on two augmented views of each image.
An architecture is a JSON file in `configs/models/` with `"modality": "image"`:

    {"modality": "image",
     "backbone": {"library": "torchvision", "name": "resnet18", "small_images": true, "kwargs": {}},
     "head": {"hidden_dim": 512, "output_dim": 128},
     "image_size": 32, "mean": [...], "std": [...], "temperature": 0.5}

`library` is `timm` (any `timm.create_model` name, its keyword arguments in `kwargs`, e.g.
a ViT's img_size, patch_size, depth) or `torchvision` (a `torchvision.models` builder;
`small_images` gives a ResNet SimCLR's CIFAR stem: a 3x3 stride-1 first convolution and no
max pool). The head is SimCLR's: Linear, BatchNorm, ReLU, Linear. `temperature` is the
loss's tau, held by the model as `logit_scale` = log(1 / tau) (a buffer, not learned), so
the trainer reads it as it reads a CLIP model's.

`encode_image` gives the backbone's features (what SimCLR probes, clusters and merges);
the head's output is for the loss only. A saved model has a stage folder's two files
(pipeline.models: WEIGHTS_NAME, CONFIG_NAME), its config's `model_cfg` with the modality,
so fingerprints, merging and loading treat it as any stage model.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"
MODALITY = "image"
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.25, 0.25, 0.25)
LIBRARIES = ("timm", "torchvision")


@functools.lru_cache(maxsize=1)
def architectures() -> dict[str, dict]:
    """The image-only architectures of configs/models, by name (read once; not to be mutated)."""
    found = {}
    for path in sorted(MODEL_CONFIG_DIR.glob("*.json")):
        try:
            cfg = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(cfg, dict) and cfg.get("modality") == MODALITY:
            found[path.stem] = cfg
    return found


def is_image_config(model_cfg: dict | None) -> bool:
    return isinstance(model_cfg, dict) and model_cfg.get("modality") == MODALITY


def check_config(cfg: dict, where: str) -> None:
    """Raise ValueError naming `where` and the key for a config that cannot build a model."""
    backbone = cfg.get("backbone")
    if not isinstance(backbone, dict) or backbone.get("library") not in LIBRARIES or not backbone.get("name"):
        raise ValueError(f"{where}: backbone: needs library ({' or '.join(LIBRARIES)}) and name")
    head = cfg.get("head", {})
    if not isinstance(head, dict) or any(not isinstance(head.get(k, 1), int) or head.get(k, 1) < 1
                                         for k in ("hidden_dim", "output_dim")):
        raise ValueError(f"{where}: head: hidden_dim and output_dim must be integers >= 1")
    if not isinstance(cfg.get("image_size"), int) or cfg["image_size"] < 8:
        raise ValueError(f"{where}: image_size: an integer >= 8 is required")
    tau = cfg.get("temperature", 0.5)
    if not isinstance(tau, (int, float)) or not 0.01 <= tau <= 1:
        raise ValueError(f"{where}: temperature: must be between 0.01 and 1, got {tau!r}")


def build_backbone(backbone: dict) -> tuple[nn.Module, int]:
    """(the backbone as a module from images to pooled features, its feature width)."""
    kwargs = dict(backbone.get("kwargs", {}))
    if backbone["library"] == "timm":
        import timm

        model = timm.create_model(backbone["name"], pretrained=False, num_classes=0, **kwargs)
        return model, int(model.num_features)
    import torchvision

    model = torchvision.models.get_model(backbone["name"], weights=None, **kwargs)
    if backbone.get("small_images"):
        if not hasattr(model, "conv1") or not hasattr(model, "maxpool"):
            raise ValueError(f"backbone {backbone['name']}: small_images needs a ResNet (conv1, maxpool)")
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    for head in ("fc", "classifier", "heads"):
        layer = getattr(model, head, None)
        if layer is not None:
            width = _in_features(layer)
            setattr(model, head, nn.Identity())
            return model, width
    raise ValueError(f"backbone {backbone['name']}: no fc, classifier or heads layer to take off")


def _in_features(layer: nn.Module) -> int:
    linear = layer if isinstance(layer, nn.Linear) else next(m for m in layer.modules() if isinstance(m, nn.Linear))
    return int(linear.in_features)


class ImageSSL(nn.Module):
    """Backbone + SimCLR projection head. `forward(images)` takes views [B, V, 3, H, W]
    (or one view [B, 3, H, W]) and returns (first view's projections, last view's, 1 / temperature),
    the projections L2-normalised: the (a, b, logit_scale.exp()) a CLIP model returns, for the same
    trainer and loss call."""

    modality = MODALITY

    def __init__(self, backbone: dict, head: dict | None = None, image_size: int = 32,
                 mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD, temperature: float = 0.5,
                 **_):
        super().__init__()
        self.backbone, width = build_backbone(backbone)
        head = head or {}
        hidden, out = head.get("hidden_dim", width), head.get("output_dim", 128)
        self.head = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, out))
        self.image_size, self.mean, self.std, self.feature_dim = image_size, tuple(mean), tuple(std), width
        self.register_buffer("logit_scale", torch.tensor(math.log(1.0 / temperature)))

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        feats = self.backbone(images)
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        raise ValueError("an image-only model has no text tower (embed with tower: image)")

    def forward(self, images: torch.Tensor, tokens: torch.Tensor | None = None):
        if images.dim() == 4:
            images = images[:, None]
        b, v = images.shape[:2]
        z = F.normalize(self.head(self.backbone(images.flatten(0, 1))), dim=-1).view(b, v, -1)
        return z[:, 0], z[:, -1], self.logit_scale.exp()  # as open_clip's CLIP returns its scale: 1 / temperature


def create(model_cfg: dict) -> ImageSSL:
    return ImageSSL(**{k: v for k, v in model_cfg.items() if k != "modality"})


def preprocess_cfg(model_cfg: dict) -> dict:
    """The input a model takes: {"size", "mean", "std"} (what a saved folder records, `eval_transform`'s keywords)."""
    return {"size": model_cfg["image_size"], "mean": list(model_cfg.get("mean", DEFAULT_MEAN)),
            "std": list(model_cfg.get("std", DEFAULT_STD))}


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]):
    """PIL image -> normalised tensor: resized (shorter side) and centre-cropped to `size`."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


def no_tokens(texts: Sequence[str]) -> torch.Tensor:
    """The tokenizer of an image-only model: no tokens ([n, 0])."""
    return torch.zeros(len(texts), 0, dtype=torch.long)


no_tokens.context_length = 0
