"""``random_control``: a negative control for method studies, not a reward to align a model with.

Its scores are N(0, 1) draws, independent of the images and the prompts, from the reward's own generator (seeded
by ``seed`` when it is built). A method trained on it moves only by drift (the noise of its updates), so it
measures how far a judge moves without any signal: a method's gain on a judge means something only where it
beats the same method trained on this control (docs/lab-results.md: the scenes world's control runs). The
generator's state is not checkpointed: a resumed run draws a new stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["RandomControl"]


class RandomControl:
    """``score(images, prompts) -> [N]`` standard normal draws that ignore their inputs."""

    name = "random_control"

    def __init__(self, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"random_control: seed must be an integer, got {seed!r}")
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"random_control: {len(images)} images but {len(prompts)} prompts")
        return torch.randn(len(images), generator=self.generator)
