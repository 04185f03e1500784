"""Image conversion shared by the reward models: tensors in [0, 1] -> PIL (what the public code scores)."""

from __future__ import annotations

import torch
from PIL import Image

__all__ = ["to_pil", "check_batch"]


def check_batch(images: torch.Tensor, prompts, name: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name}: images must be [N, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{name}: got {images.shape[0]} images but {len(prompts)} prompts")


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[N, 3, H, W]`` floats in [0, 1] -> RGB PIL images (rounded to uint8, as saved images are)."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
