"""Images cross from the DataLoader workers as uint8 and are normalised on the device.

open_clip's transforms (train: RandomResizedCrop; eval: Resize + CenterCrop) end with
`ToTensor` (uint8 -> float in [0, 1]) and `Normalize(mean, std)`. A float32 batch is four
times the bytes of the uint8 one, and the DataLoader keeps `workers x prefetch_factor` of
them per rank in host memory. `split_transform` cuts the transform before `ToTensor`: the
workers run the geometric part and `PILToTensor` (uint8 CHW), and `DeviceNormalize` does
`x.float() / 255`, then `(x - mean) / std`, on the batch once it is on the device. Those are
the operations `ToTensor` + `Normalize` do on the CPU, in the same order, so the model
inputs are the same (bit for bit on the CPU).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torchvision import transforms as T


class DeviceNormalize(torch.nn.Module):
    """uint8 [B, 3, H, W] -> float32 normalised images, on the batch's device. A float batch
    passes through unchanged (it is taken as already normalised)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.is_floating_point():
            return images
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        return images.to(torch.float32).div_(255).sub_(mean).div_(std)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def split_transform(transform: Callable) -> tuple[T.Compose, DeviceNormalize]:
    """(the uint8 part: PIL image -> uint8 CHW tensor, the normalisation for the device) of an
    open_clip image transform: a torchvision Compose ending in ToTensor and Normalize. Any
    other transform (timm's, a custom one) is refused with a ValueError naming it."""
    steps = list(getattr(transform, "transforms", []))
    at = next((i for i, t in enumerate(steps) if isinstance(t, T.ToTensor)), None)
    if at is None or at + 2 != len(steps) or not isinstance(steps[at + 1], T.Normalize):
        raise ValueError(f"cannot split the image transform {transform!r}: expected a Compose ending in "
                         f"ToTensor() and Normalize(mean, std) (open_clip's train and eval transforms)")
    norm = steps[at + 1]
    return T.Compose(steps[:at] + [T.PILToTensor()]), DeviceNormalize(norm.mean, norm.std)

