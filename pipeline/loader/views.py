"""Two augmented views of each image, for image-only (SimCLR) training.

The augmentations decide which features can be learned at all: a view pair that differs by
a flip makes orientation invariant, a crop position, a colour jitter colour. They are a
list of torchvision transforms by class name, applied to the PIL image in order (the run
config's `train.views`):

    views:
      - RandomResizedCrop: {scale: [0.08, 1.0]}       # `size` defaults to the model's
      - RandomHorizontalFlip
      - {ColorJitter: {brightness: 0.4, contrast: 0.4, saturation: 0.4, hue: 0.1}, p: 0.8}
      - RandomGrayscale: {p: 0.2}

An item is a class name, or a mapping of one class name to its keyword arguments, with
an optional `p` (the transform wrapped in RandomApply). None is SimCLR's recipe, the list
above. After them every view is resized and centre-cropped to the model's size and made a
uint8 tensor; `TwoViews` returns both stacked, [2, 3, H, W], and the device normalises
them (pipeline.loader.images).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torchvision import transforms as T

SIMCLR = [{"RandomResizedCrop": {"scale": [0.08, 1.0]}}, "RandomHorizontalFlip",
          {"ColorJitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}, "p": 0.8},
          {"RandomGrayscale": {"p": 0.2}}]


def _parse(item: Any, where: str) -> tuple[str, dict, float | None]:
    if isinstance(item, str):
        return item, {}, None
    if isinstance(item, dict):
        names = [k for k in item if k != "p"]
        if len(names) == 1 and isinstance(item[names[0]] or {}, dict):
            p = item.get("p")
            if p is not None and not (isinstance(p, (int, float)) and 0 <= p <= 1):
                raise ValueError(f"{where}: p must be between 0 and 1, got {p!r}")
            return names[0], dict(item[names[0]] or {}), p
    raise ValueError(f"{where}: expected a transform name or {{Name: {{keyword: value}}, p: prob}}, got {item!r}")


def _build(name: str, kwargs: dict, size: int, where: str):
    cls = getattr(T, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, torch.nn.Module)) and name not in ("RandomApply",):
        raise ValueError(f"{where}: {name!r} is not a torchvision.transforms transform")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    params = inspect.signature(cls).parameters
    if "size" in params and params["size"].default is inspect.Parameter.empty and "size" not in kwargs:
        kwargs["size"] = size
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {name}({kwargs}): {exc}") from None


def augmentations(views: list | None, size: int, where: str = "views") -> list:
    """The torchvision transforms of a `views` list (None: SimCLR's); ValueError naming the item."""
    if views is not None and not isinstance(views, list):
        raise ValueError(f"{where}: must be a list of transforms, got {views!r}")
    out = []
    for i, item in enumerate(SIMCLR if views is None else views):
        name, kwargs, p = _parse(item, f"{where}[{i}]")
        transform = _build(name, kwargs, size, f"{where}[{i}]")
        out.append(T.RandomApply([transform], p=p) if p is not None else transform)
    return out


class TwoViews:
    """PIL image -> uint8 [2, 3, size, size]: two independent draws of the augmentations."""

    def __init__(self, views: list | None, size: int):
        self.view = T.Compose(augmentations(views, size) + [T.Resize(size), T.CenterCrop(size), T.PILToTensor()])

    def __call__(self, image) -> torch.Tensor:
        return torch.stack([self.view(image), self.view(image)])

    def __repr__(self) -> str:
        return f"TwoViews({self.view!r})"
