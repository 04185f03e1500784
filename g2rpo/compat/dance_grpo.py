"""DanceGRPO's ``flux_step`` (``fastvideo/train_grpo_flux.py``).

Swap it in by changing one import (or the function's definition)::

    from g2rpo.compat.dance_grpo import flux_step
"""

from __future__ import annotations

import torch

from ..sde import sde_coefficients, sde_transition
from ._public_math import PRECISIONS, check_step_inputs, dance_flux_step

__all__ = ["flux_step"]


def flux_step(model_output: torch.Tensor, latents: torch.Tensor, eta: float, sigmas: torch.Tensor, index: int,
              prev_sample: torch.Tensor | None, grpo: bool, sde_solver: bool, *, precision: str = "public"):
    """DanceGRPO's Flux step from ``sigmas[index]`` to ``sigmas[index + 1]``.

    ``sde_solver``: the constant-diffusion SDE mean (the score term ``-0.5 eta^2 score dt``), else the
    Euler mean; the noise std is ``eta * sqrt(|dt|)`` in both cases (as DanceGRPO). Returns
    ``(prev_sample, pred_original_sample, log_prob)`` with ``grpo`` (noise from ``torch.randn_like``
    when ``prev_sample`` is None, as DanceGRPO), else ``(prev_sample_mean, pred_original_sample)``.

    ``precision="public"`` (default): DanceGRPO's own arithmetic in the inputs' dtypes, bit-equal to it for
    the same inputs and RNG state (a bf16 model output with fp32 latents, as its trainer calls it, or any
    other dtypes), the same returned dtypes. ``precision="fp32"``: g2rpo's fp32 math (:mod:`g2rpo.sde`;
    inputs cast to fp32 first, fp32 out).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    index = check_step_inputs(model_output, latents, sigmas, index, prev_sample, "flux_step")
    if precision == "public":
        if grpo and float(eta) == 0.0:
            raise ValueError("math domain error: eta = 0 gives std_dev_t = 0 (DanceGRPO's math.log(std_dev_t) fails "
                             "too)")
        return dance_flux_step(model_output, latents, eta, sigmas, index, prev_sample, grpo, sde_solver)
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
