"""The public Flux GRPO steps' arithmetic in the caller's dtypes (what the drop-ins return by default).

DanceGRPO's ``flux_step`` and the official G2RPO ``flow_grpo_step`` are called with a bf16 model output
(autocast) and fp32 latents. Their products of a 0-d fp32 schedule value and the bf16 output stay bf16
(a 0-d tensor does not promote a dimensioned one), and only then meet the fp32 latents. Bit-equality with
them needs that same order of operations in those same dtypes; g2rpo's own math (:mod:`g2rpo.sde`, fp32
throughout) is the ``precision="fp32"`` option of each drop-in.
"""

from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import randn_tensor

__all__ = ["PRECISIONS", "check_step_inputs", "dance_flux_step", "official_flow_grpo_step"]

PRECISIONS = ("public", "fp32")


def check_step_inputs(model_output, latents, sigmas, index, prev_sample, name: str) -> int:
    """The checks a drop-in step makes before computing (shapes and the index; the schedule's order): a clear
    ValueError naming the argument instead of a silent broadcast, a 0-d log-prob, an IndexError or NaN. They
    read shapes and two schedule values; the arithmetic is untouched. Returns the index as an int."""
    for arg, t in (("model_output", model_output), ("latents", latents), ("sigmas", sigmas)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: {arg} must be a tensor, got {type(t).__name__}")
    if latents.ndim < 2:
        raise ValueError(f"{name}: latents must be [B, ...] with a batch dim, got shape {tuple(latents.shape)}")
    if model_output.shape != latents.shape:
        raise ValueError(f"{name}: model_output has shape {tuple(model_output.shape)}, latents "
                         f"{tuple(latents.shape)}: they must be equal (no broadcasting)")
    if prev_sample is not None and (not isinstance(prev_sample, torch.Tensor) or prev_sample.shape != latents.shape):
        shape = tuple(prev_sample.shape) if isinstance(prev_sample, torch.Tensor) else type(prev_sample).__name__
        raise ValueError(f"{name}: prev_sample has shape {shape}, latents {tuple(latents.shape)}: they must be equal")
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"{name}: sigmas must be a 1-D schedule of at least 2 values, got shape {tuple(sigmas.shape)}")
    if isinstance(index, torch.Tensor) and index.ndim == 0 and not index.is_floating_point():
        index = int(index)
    if isinstance(index, bool) or not isinstance(index, int):
        raise ValueError(f"{name}: index must be an int, got {index!r}")
    if not 0 <= index < sigmas.numel() - 1:
        raise ValueError(f"{name}: index must be in 0..{sigmas.numel() - 2} (a step needs a next sigma), got {index}")
    if not bool(sigmas[index + 1] < sigmas[index]):
        raise ValueError(f"{name}: the schedule must decrease: sigmas[{index}] = {float(sigmas[index]):g}, "
                         f"sigmas[{index + 1}] = {float(sigmas[index + 1]):g}")
    return index


def _log_sqrt_2pi() -> torch.Tensor:
    """log(sqrt(2 pi)) as the public code computes it: from a default-dtype (fp32) 0-d tensor."""
    return torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))


def _mean_over_dims(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=tuple(range(1, t.ndim)))


def dance_flux_step(model_output, latents, eta, sigmas, index, prev_sample, grpo, sde_solver):
    """DanceGRPO's step: Euler mean ``x + dsigma v``, with ``sde_solver`` the constant-diffusion score term
    ``-0.5 eta^2 s dsigma`` (s = -(x - x0 (1 - sigma)) / sigma^2), noise std ``eta sqrt(sigma - sigma_next)``
    (a Python float), noise ``randn_like`` of the mean."""
    sigma = sigmas[index]
    dsigma = sigmas[index + 1] - sigma
    mean = latents + dsigma * model_output
    x0 = latents - sigma * model_output
    std = eta * math.sqrt(sigma - sigmas[index + 1])
    if sde_solver:
        score = -(latents - x0 * (1 - sigma)) / sigma**2
        mean = mean + (-0.5 * eta**2 * score) * dsigma
    if not grpo:
        return mean, x0
    if prev_sample is None:
        prev_sample = mean + torch.randn_like(mean) * std
    log_prob = (-((prev_sample.detach().to(torch.float32) - mean.to(torch.float32)) ** 2) / (2 * std**2)
                - math.log(std) - _log_sqrt_2pi())
    return prev_sample, x0, _mean_over_dims(log_prob)


def official_flow_grpo_step(model_output, latents, eta, sigmas, index, prev_sample, generator=None):
    """The official G2RPO step (Flow-GRPO's SDE, Eq. 2-3): ``sigma_t = eta sqrt(sigma / (1 - sigma))`` with
    ``sigmas[1]`` replacing sigma in (1 - sigma) at sigma = 1, noise ``randn_tensor`` in the output's dtype."""
    device = model_output.device
    sigma, sigma_next = sigmas[index].to(device), sigmas[index + 1].to(device)
    dt = sigma_next - sigma
    x0 = latents - sigma * model_output
    sigma_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigmas[1].item(), sigma))) * eta
    mean = (latents * (1 + sigma_t**2 / (2 * sigma) * dt)
            + model_output * (1 + sigma_t**2 * (1 - sigma) / (2 * sigma)) * dt)
    step_std = sigma_t * torch.sqrt(-1 * dt)
    if prev_sample is None:
        noise = randn_tensor(model_output.shape, generator=generator, device=device, dtype=model_output.dtype)
        prev_sample = mean + step_std * noise
    log_prob = -((prev_sample.detach() - mean) ** 2) / (2 * step_std**2) - torch.log(step_std) - _log_sqrt_2pi()
    return prev_sample, x0, _mean_over_dims(log_prob)
