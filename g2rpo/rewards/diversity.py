"""Within-prompt diversity of samples: a metric of a batch (how far a prompt's samples lie from one another), not a
per-image reward. Used by the lab worlds' evaluations and by validation during training."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["pairwise_distance_mean", "diversity"]


def pairwise_distance_mean(rows: torch.Tensor, cosine: bool = False) -> float:
    """Mean distance over the ordered pairs ``i != j`` of ``rows [n, ...]`` (n >= 2), flattened and in float64:
    ``1 - cos`` (embeddings) or the RMS difference (pixels: the Euclidean distance over sqrt of the dimension)."""
    x = rows.flatten(1).double()
    n = x.shape[0]
    if cosine:
        x = torch.nn.functional.normalize(x, dim=1)
        d = 1.0 - x @ x.T
    else:
        d = torch.cdist(x, x) / x.shape[1] ** 0.5
    return float(d.sum() / (n * (n - 1)))


def diversity(features: torch.Tensor, per_prompt: int, cosine: bool = False) -> float:
    """Mean over prompts of :func:`pairwise_distance_mean` of each prompt's ``per_prompt`` consecutive rows of
    ``features``; NaN when no prompt has two."""
    vals = [pairwise_distance_mean(features[lo:lo + per_prompt], cosine)
            for lo in range(0, features.shape[0], per_prompt) if features[lo:lo + per_prompt].shape[0] >= 2]
    return float(np.mean(vals)) if vals else float("nan")
