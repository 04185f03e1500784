"""The reward-model protocol, and rewards built from other rewards (weighted sums, frame-wise video scores)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

__all__ = ["FRAME_REDUCTIONS", "FrameAggregated", "RewardModel", "WeightedRewards"]

FRAME_REDUCTIONS = ("mean", "min", "max")


@runtime_checkable
class RewardModel(Protocol):
    """``score(images, prompts) -> [N]`` float tensor; batched, no grad, own preprocessing.

    ``images`` are ``[N, C, H, W]`` (or ``[N, H, W]`` for 1-channel lab images) in [0, 1].
    """

    name: str

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


class WeightedRewards:
    """A weighted sum of reward models as one reward (for reporting a combined score)."""

    def __init__(self, models: Sequence[RewardModel], weights: Sequence[float], name: str = "weighted") -> None:
        if len(models) != len(weights) or not models:
            raise ValueError(f"need one weight per reward model, got {len(models)} models and {len(weights)} weights")
        self.models, self.weights, self.name = list(models), [float(w) for w in weights], name

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return sum(w * m.score(images, prompts).float() for m, w in zip(self.models, self.weights))


class FrameAggregated:
    """Any image reward applied to videos ``[N, C, F, H, W]`` frame by frame and reduced over the frames
    (``mean`` by default, ``min`` or ``max``); images ``[N, C, H, W]``, and any input of a reward marked
    ``video_reward = True`` (which scores a video as a whole), pass through unchanged."""

    def __init__(self, model: RewardModel, frames: str = "mean") -> None:
        if frames not in FRAME_REDUCTIONS:
            raise ValueError(f"frames must be one of {FRAME_REDUCTIONS}, got {frames!r}")
        self.model, self.frames = model, frames
        self.name = getattr(model, "name", type(model).__name__)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if images.ndim != 5 or getattr(self.model, "video_reward", False):  # a video reward scores videos whole
            return self.model.score(images, prompts)
        n, c, f = images.shape[:3]
        frames = images.transpose(1, 2).reshape(n * f, c, *images.shape[3:])
        s = self.model.score(frames, [p for p in prompts for _ in range(f)]).float().view(n, f)
        return {"mean": s.mean(1), "min": s.amin(1), "max": s.amax(1)}[self.frames]
