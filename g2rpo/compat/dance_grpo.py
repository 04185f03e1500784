"""DanceGRPO's ``flux_step`` (``fastvideo/train_grpo_flux.py``).

Swap it in by changing one import (or the function's definition)::

    from g2rpo.compat.dance_grpo import flux_step
"""

from __future__ import annotations

import torch

from ..sde import sde_coefficients, sde_transition

__all__ = ["flux_step"]


def flux_step(model_output: torch.Tensor, latents: torch.Tensor, eta: float, sigmas: torch.Tensor, index: int,
              prev_sample: torch.Tensor | None, grpo: bool, sde_solver: bool):
    """DanceGRPO's Flux step from ``sigmas[index]`` to ``sigmas[index + 1]``.

    ``sde_solver``: the constant-diffusion SDE mean (the score term ``-0.5 eta^2 score dt``), else the
    Euler mean; the noise std is ``eta * sqrt(|dt|)`` in both cases (as DanceGRPO). Returns
    ``(prev_sample, pred_original_sample, log_prob)`` with ``grpo`` (noise from ``torch.randn_like``
    when ``prev_sample`` is None, as DanceGRPO), else ``(prev_sample_mean, pred_original_sample)``.
    fp32 math.
    """
    x, v = latents.float(), model_output.float()
    sig = sigmas.to(torch.float64)
    pred_original_sample = x - float(sig[index]) * v
    a, b, std = sde_coefficients(sigmas, index, float(eta), "dance_grpo")
    if not sde_solver:  # Euler mean, DanceGRPO's noise level
        a, b, _ = sde_coefficients(sigmas, index, 0.0, "dance_grpo")
    if not grpo:
        return a.float().item() * x + b.float().item() * v, pred_original_sample
    if float(eta) == 0.0:
        raise ValueError("math domain error: eta = 0 gives std_dev_t = 0 (DanceGRPO's math.log(std_dev_t) fails too)")
    noise = None
    if prev_sample is None:
        noise = torch.randn_like(x)
    prev, log_prob, _ = sde_transition(x, v, a, b, std, noise=noise, x_next=prev_sample)
    return prev, pred_original_sample, log_prob
