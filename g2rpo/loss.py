"""The clipped GRPO surrogate (Eq. 5-6, 9, 12) and the Gaussian KL to a reference policy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SurrogateOutput", "clipped_surrogate", "gaussian_kl"]


@dataclass
class SurrogateOutput:
    loss: torch.Tensor  # per transition
    ratio: torch.Tensor  # per transition (detached)
    clipped: torch.Tensor  # per transition: |ratio - 1| > clip_range (Flow-GRPO's clip fraction)


def clipped_surrogate(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                      clip_range: float, adv_clip_max: float) -> SurrogateOutput:
    """Per-transition PPO-clip loss ``max(-A r, -A clip(r, 1-eps, 1+eps))`` with ``A`` clipped to
    ``[-adv_clip_max, adv_clip_max]`` and ``r = exp(log_prob - old_log_prob)`` (Eq. 7, 12).

    Minimising its mean maximises Eq. 12's mean over branches and trained steps.
    """
    if not (log_prob.shape == old_log_prob.shape == advantages.shape):
        raise ValueError(f"shape mismatch: log_prob {tuple(log_prob.shape)}, old_log_prob "
                         f"{tuple(old_log_prob.shape)}, advantages {tuple(advantages.shape)}")
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return SurrogateOutput(torch.maximum(unclipped, clipped), ratio.detach(),
                           ((ratio.detach() - 1.0).abs() > clip_range))


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2 I) || N(ref_mean, std^2 I)) averaged over non-batch dims (per row).

    Both policies share the step's noise level, so the KL is the squared mean gap over
    ``2 std^2`` (Flow-GRPO's KL term).
    """
    kl = (mean - ref_mean) ** 2 / (2.0 * std**2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))
