"""The lab world's data: scikit-learn's bundled 8x8 handwritten digits (offline).

Images are scaled from 0..16 to [-1, 1] (the generator's space); ``size=16`` upsamples
bilinearly to 16x16. Splits are stratified and fixed by ``seed``: ``train`` (the
generator and the in-domain rewards), ``val`` (the out-of-domain judge, never seen by
the rewards), ``test`` (held-out real digits for reference accuracies).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

__all__ = ["DigitSplits", "load_splits", "to_unit", "from_unit"]


@dataclass(frozen=True)
class DigitSplits:
    """Images ``[N, size, size]`` in [-1, 1] (float32) and labels ``[N]`` (int64) per split."""

    size: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


def from_unit(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return images * 2.0 - 1.0


def load_splits(seed: int = 0, size: int = 8, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> DigitSplits:
    """Deterministic stratified train/val/test splits of the bundled digits."""
    if size not in (8, 16):
        raise ValueError(f"size must be 8 or 16, got {size}")
    if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) <= 0:
        raise ValueError(f"fractions must be positive and sum to 1, got {fractions}")
    digits = load_digits()
    x = torch.from_numpy((digits.images / 16.0).astype(np.float32)) * 2.0 - 1.0
    y = torch.from_numpy(digits.target.astype(np.int64))
    idx = np.arange(len(y))
    train, rest = train_test_split(idx, train_size=fractions[0], stratify=y.numpy(), random_state=seed)
    val_share = fractions[1] / (fractions[1] + fractions[2])
    val, test = train_test_split(rest, train_size=val_share, stratify=y.numpy()[rest], random_state=seed)
    if size == 16:
        x = F.interpolate(x[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    t = lambda i: torch.as_tensor(np.sort(i))  # noqa: E731
    return DigitSplits(size, x[t(train)], y[t(train)], x[t(val)], y[t(val)], x[t(test)], y[t(test)])
