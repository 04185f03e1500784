"""ODE/SDE transitions of flow-matching samplers and their Gaussian log-probs.

This module is the torch reference of the project's math; the Triton kernels and the
C++/CUDA op implement :func:`sde_transition` and must match it.

Time runs from sigma = 1 (noise) to sigma = 0 (image) on a grid ``sigmas`` of length
T + 1 (see :mod:`g2rpo.schedule`); a step goes from ``sigmas[index]`` to
``sigmas[index + 1]`` so ``dt < 0``. All SDE kinds share one affine form::

    mean   = a * x + b * v                       (Eq. 2-3)
    x_next = mean + std * eps,   eps ~ N(0, I)
    log p  = mean over non-batch dims of  -(x_next - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)

with per-row scalars (a, b, std) from :func:`sde_coefficients`:

* ``flow_grpo`` (Flow-GRPO, used by G2RPO and MixGRPO): sigma_t = eta * sqrt(t / (1 - t)),
  a = 1 + sigma_t^2 / (2t) dt, b = (1 + sigma_t^2 (1 - t) / (2t)) dt, std = sigma_t sqrt(|dt|).
  At t = 1 sigma_t diverges; as Flow-GRPO, the denominator uses the next schedule value
  ``sigmas[1]`` instead of 1, so sigma_t(1) = eta * sqrt(1 / (1 - sigmas[1])).
* ``dance_grpo`` (DanceGRPO's ``flux_step``): constant diffusion, the score term
  -0.5 eta^2 * score * dt with score = -(x - (1 - t) x0_hat) / t^2 and x0_hat = x - t v,
  which is the same affine form with sigma_t^2 replaced by eta^2 and std = eta sqrt(|dt|).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

__all__ = [
    "SDE_KINDS",
    "SdeKind",
    "diffusion",
    "sde_coefficients",
    "sde_transition",
    "gaussian_log_prob",
    "log_density_from_sums",
    "Diffusion",
    "SdeCoefficients",
    "SdeStep",
    "sde_step_with_logprob",
    "ode_step",
]

SdeKind = Literal["flow_grpo", "dance_grpo"]
SDE_KINDS: tuple[str, ...] = ("flow_grpo", "dance_grpo")
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

IndexLike = int | torch.Tensor


def _index_tensor(sigmas: torch.Tensor, index: IndexLike, name: str) -> torch.Tensor:
    """Validate ``index`` (int or integer tensor of per-row indices) against ``sigmas``."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D schedule of length >= 2, got shape {tuple(sigmas.shape)}")
    idx = torch.as_tensor(index, device=sigmas.device)
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got dtype {idx.dtype}")
    if idx.ndim > 1:
        raise ValueError(f"{name} must be an int or a 1-D tensor of per-row indices, got shape {tuple(idx.shape)}")
    last = sigmas.numel() - 1
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) > last):
        raise ValueError(f"{name} must be in 0..{last}, got {idx.tolist()}")
    return idx.long()


class Diffusion(NamedTuple):
    sigma_t: torch.Tensor
    t: torch.Tensor
    dt: torch.Tensor


class SdeCoefficients(NamedTuple):
    """``x_next = a x + b v + std * eps`` (per row, float64)."""

    a: torch.Tensor
    b: torch.Tensor
    std: torch.Tensor


class SdeStep(NamedTuple):
    """What :func:`sde_step_with_logprob` returns (Flow-GRPO's order: a 4-tuple)."""

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def diffusion(sigmas: torch.Tensor, index: IndexLike, eta: float, kind: SdeKind = "flow_grpo") -> Diffusion:
    """Float64 ``(sigma_t, t, dt)`` of the step ``sigmas[index] -> sigmas[index + 1]``: the SDE's
    diffusion coefficient (Eq. 3: ``eta * sqrt(t / (1 - t))`` for ``flow_grpo``, with the next schedule
    value replacing t in (1 - t) at t = 1; the constant ``eta`` for ``dance_grpo``), the time and the
    (negative) step."""
    if kind not in SDE_KINDS:
        raise ValueError(f"kind must be one of {SDE_KINDS}, got {kind!r}")
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    idx = _index_tensor(sigmas, index, "index")
    if idx.numel() and int(idx.max()) >= sigmas.numel() - 1:
        raise ValueError(f"index must be in 0..{sigmas.numel() - 2} (a step needs a next sigma), got {idx.tolist()}")
    sig = sigmas.to(torch.float64)
    t = sig[idx]
    dt = sig[idx + 1] - t
    if kind == "flow_grpo":  # Flow-GRPO's t = 1 rule: the next schedule value replaces t in (1 - t)
        sigma_t = float(eta) * torch.sqrt(t / (1.0 - torch.where(t == 1.0, sig[1], t)))
    else:
        sigma_t = torch.full_like(t, float(eta))
    return Diffusion(sigma_t, t, dt)


def sde_coefficients(sigmas: torch.Tensor, index: IndexLike, eta: float, kind: SdeKind = "flow_grpo") -> SdeCoefficients:
    """Per-row float64 coefficients ``(a, b, std)`` of the step ``sigmas[index] -> sigmas[index+1]``.

    ``index`` is an int (scalars returned as 0-d tensors) or a 1-D tensor of per-row indices.
    ``eta = 0`` gives the Euler ODE step (a = 1, b = dt, std = 0).
    """
    sigma_t, t, dt = diffusion(sigmas, index, eta, kind)
    diffusion_sq = sigma_t**2
    std = sigma_t * torch.sqrt(-dt)
    a = 1.0 + diffusion_sq / (2.0 * t) * dt
    b = (1.0 + diffusion_sq * (1.0 - t) / (2.0 * t)) * dt
    return SdeCoefficients(a, b, std)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Log-density of ``x`` under N(mean, std^2 I), averaged over all non-batch dims (Eq. 3's Gaussian).

    ``std`` broadcasts against ``x`` (a per-row tensor viewed as ``[B, 1, ...]``).
    The mean (not the sum) over dims is the Flow-GRPO / DanceGRPO convention.
    """
    lp = -((x - mean) ** 2) / (2.0 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def log_density_from_sums(sq_sums: torch.Tensor, std: torch.Tensor, n: int) -> torch.Tensor:
    """:func:`gaussian_log_prob` from per-row sums of squared residuals ``sum_n (x - mean)^2`` over ``n``
    elements and per-row ``std``: ``-S / (2 std^2 n) - log std - log sqrt(2 pi)`` (what the fused ops reduce to)."""
    return -sq_sums / (2.0 * std**2 * n) - torch.log(std) - _LOG_SQRT_2PI


def _rows(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """View a 0-d or [B] coefficient tensor as [B, 1, ..., 1] for broadcasting."""
    return t.reshape(-1, *([1] * (ndim - 1)))


def sde_transition(
    x: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    std: torch.Tensor,
    noise: torch.Tensor | None = None,
    x_next: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference every fused kernel implements: ``(x_next, log_prob, mean)``.

    fp32 math: ``mean = a x + b v``; with ``x_next`` given it is scored (gradients flow
    through ``mean`` only, ``x_next`` is detached), else ``x_next = mean + std * noise``.
    ``v`` may have batch 1 (shared velocity) and broadcasts over ``x``'s rows; ``a``,
    ``b``, ``std`` are 0-d or per-row ``[B]`` tensors.
    """
    if (noise is None) == (x_next is None):
        raise ValueError("pass exactly one of noise (to sample) or x_next (to score)")
    x, v = x.float(), v.float()
    a, b, std = (_rows(c.to(device=x.device, dtype=torch.float32), x.ndim) for c in (a, b, std))
    mean = a * x + b * v
    if x_next is None:
        x_next = mean + std * noise.float()
    else:
        x_next = x_next.detach().float()
    log_prob = gaussian_log_prob(x_next, mean, std)
    return x_next, log_prob, mean


def sde_step_with_logprob(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigmas: torch.Tensor,
    index: IndexLike,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    kind: SdeKind = "flow_grpo",
) -> SdeStep:
    """One SDE step ``sigmas[index] -> sigmas[index + 1]`` with its log-prob (Eq. 2-3, 7).

    Flow-GRPO's ``sde_step_with_logprob`` semantics: fp32 math whatever the input
    dtype, log-prob averaged over non-batch dims, ``prev_sample`` given -> it is scored
    and no noise is drawn. ``velocity`` may have batch 1 and is then shared by every
    row of ``sample`` (the group's shared v_k). ``index`` is an int or per-row indices.
    ``noise`` (standard normal, shape of ``sample``) replaces drawing from ``generator``.

    Returns ``(prev_sample, log_prob, mean, std)``: fp32 ``[B, ...]``, ``[B]``,
    ``[B, ...]`` and the transition std ``sigma_t * sqrt(|dt|)`` viewed ``[B or 1, 1, ...]``.
    With ``eta = 0`` the step is the Euler ODE step and ``log_prob`` is NaN (undefined).
    """
    if sample.ndim < 2:
        raise ValueError(f"sample must be [B, ...] with at least 2 dims, got shape {tuple(sample.shape)}")
    if velocity.shape[1:] != sample.shape[1:] or velocity.shape[0] not in (1, sample.shape[0]):
        raise ValueError(
            f"velocity shape {tuple(velocity.shape)} does not match sample shape {tuple(sample.shape)} "
            "(velocity batch must be 1 or the sample batch)"
        )
    if prev_sample is not None and prev_sample.shape != sample.shape:
        raise ValueError(f"prev_sample shape {tuple(prev_sample.shape)} != sample shape {tuple(sample.shape)}")
    if prev_sample is not None and (noise is not None or generator is not None):
        raise ValueError("prev_sample is scored, not sampled: do not pass noise or generator with it")
    if noise is not None and generator is not None:
        raise ValueError("pass either noise or generator, not both")
    if noise is not None and noise.shape != sample.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != sample shape {tuple(sample.shape)}")
    idx = torch.as_tensor(index)
    if idx.ndim == 1 and idx.numel() != sample.shape[0]:
        raise ValueError(f"per-row index has {idx.numel()} entries for {sample.shape[0]} rows")

    a, b, std = sde_coefficients(sigmas, index, eta, kind)
    if prev_sample is None and noise is None:
        noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
    if float(eta) == 0.0:
        mean = _rows(a.float(), sample.ndim) * sample.float() + _rows(b.float(), sample.ndim) * velocity.float()
        out = mean if prev_sample is None else prev_sample.float()
        nan = torch.full((sample.shape[0],), float("nan"), device=sample.device)
        return SdeStep(out, nan, mean, _rows(std.float().to(sample.device), sample.ndim))
    prev, log_prob, mean = sde_transition(sample, velocity, a, b, std, noise=noise, x_next=prev_sample)
    return SdeStep(prev, log_prob, mean, _rows(std.to(device=sample.device, dtype=torch.float32), sample.ndim))


def ode_step(
    velocity: torch.Tensor, sample: torch.Tensor, sigmas: torch.Tensor, index: IndexLike, next_index: IndexLike
) -> torch.Tensor:
    """Euler ODE step (Eq. 1) from ``sigmas[index]`` to ``sigmas[next_index]``, in fp32.

    ``index``/``next_index`` are ints or per-row index tensors; ``velocity`` may have
    batch 1 and broadcast over ``sample``.
    """
    if velocity.shape[1:] != sample.shape[1:] or velocity.shape[0] not in (1, sample.shape[0]):
        raise ValueError(f"velocity shape {tuple(velocity.shape)} does not match sample shape {tuple(sample.shape)}")
    i = _index_tensor(sigmas, index, "index")
    j = _index_tensor(sigmas, next_index, "next_index")
    dt = (sigmas.to(torch.float64)[j] - sigmas.to(torch.float64)[i]).to(device=sample.device, dtype=torch.float32)
    return sample.float() + _rows(dt, sample.ndim) * velocity.float()
