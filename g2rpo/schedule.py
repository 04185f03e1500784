"""Shifted flow-matching sigma schedules and the multi-granularity grids (Eq. 10).

Grid indices run 0..T: index 0 is pure noise (sigma = 1), index T the image (sigma = 0).
Paper step k (k = T..1, moving x_k to x_{k-1}) is grid index e = T - k.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SCHEDULE_PRECISIONS", "check_sigmas", "distinct_sde_indices", "sigma_schedule", "granularity_grid", "model_timesteps"]


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return value


SCHEDULE_PRECISIONS = ("float64", "float32")


def sigma_schedule(num_steps: int, shift: float = 3.0, precision: str = "float64") -> torch.Tensor:
    """Return the T+1 shifted sigmas from 1 to 0 as float64.

    ``s`` is uniform on the grid ``linspace(1, 0, T+1)`` and is shifted by
    ``sigma = shift * s / (1 + (shift - 1) * s)`` (Flux's static shift; diffusers'
    ``FlowMatchEulerDiscreteScheduler(shift=shift)`` gives the same values). ``precision="float32"``
    computes both in fp32 as the public Flux GRPO code does (``sd3_time_shift(shift, torch.linspace(1, 0,
    T + 1))``): some sigmas then differ by an ulp (T = 10: 4 of them), which can move a quantised timestep.
    """
    num_steps = _check_int("num_steps", num_steps)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    if precision not in SCHEDULE_PRECISIONS:
        raise ValueError(f"precision must be one of {SCHEDULE_PRECISIONS}, got {precision!r}")
    if precision == "float32":
        s = torch.linspace(1, 0, num_steps + 1)  # fp32, as the public code
        return (shift * s / (1 + (shift - 1) * s)).double()
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    sigmas = shift * s / (1.0 + (shift - 1.0) * s)
    sigmas[0], sigmas[-1] = 1.0, 0.0  # exact end points whatever the rounding
    return sigmas


def check_sigmas(sigmas, num_steps: int) -> torch.Tensor:
    """A given schedule (a pipeline's own) as float64 ``[T + 1]``: strictly decreasing from at most 1 to 0, one more
    value than ``num_steps`` (ValueError naming what is wrong)."""
    sig = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().flatten()
    num_steps = _check_int("num_steps", num_steps)
    if sig.numel() != num_steps + 1:
        raise ValueError(f"a schedule for {num_steps} steps has {num_steps + 1} sigmas, got {sig.numel()}")
    if not torch.isfinite(sig).all() or sig[0] > 1 or sig[-1] != 0 or not (sig[1:] < sig[:-1]).all():
        raise ValueError(f"sigmas must fall strictly from at most 1 to exactly 0, got {sig.tolist()}")
    return sig


def granularity_grid(num_steps: int, sde_index: int, granularity: int) -> list[int]:
    """Grid indices visited by the ODE continuation after the SDE step at ``sde_index``.

    The SDE step at grid index ``e`` lands at ``e + 1``; the continuation with
    granularity ``lambda`` visits ``[e+1] + range(e+2, T+1, lambda)`` with the last
    element replaced by ``T`` when it is not ``T`` (PAPER.md, Decisions). The
    continuation makes ``len(grid) - 1 = ceil((T - e - 1) / lambda)`` ODE steps, the
    paper's ``ceil((k - 1) / lambda)`` with ``k = T - e``.
    Example: ``granularity_grid(16, 0, 3) == [1, 2, 5, 8, 11, 16]``.
    """
    num_steps = _check_int("num_steps", num_steps)
    sde_index = _check_int("sde_index", sde_index)
    granularity = _check_int("granularity", granularity)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 <= sde_index < num_steps:
        raise ValueError(f"sde_index must be in 0..{num_steps - 1}, got {sde_index}")
    if granularity < 1:
        raise ValueError(f"granularity must be >= 1, got {granularity}")
    grid = [sde_index + 1] + list(range(sde_index + 2, num_steps + 1, granularity))
    if grid[-1] != num_steps:
        grid[-1] = num_steps
    return grid


def model_timesteps(sigmas: torch.Tensor, quantize: bool = False) -> torch.Tensor:
    """The time fed to the velocity model for the given sigmas.

    With ``quantize=True`` the value is ``int(sigma * 1000) / 1000`` as in the public
    Flux GRPO code (DanceGRPO, MixGRPO, G2RPO), which conditions the transformer on
    ``int(sigma * 1000)`` timesteps; the SDE/ODE math always uses the exact sigma. As there,
    ``sigma * 1000`` is computed in float32 (fp32 0.9 * 1000 rounds to 900, where float64
    gives 899.99998 and truncates to 899), and ``timesteps / 1000`` divides in float32.
    """
    if not quantize:
        return sigmas
    return torch.floor(sigmas.float() * 1000.0).div(1000.0).to(sigmas.dtype)


def distinct_sde_indices(num_steps: int, granularities, candidates) -> list[int]:
    """The SDE indices of ``candidates`` after which every granularity gives its own continuation (at a small T
    two granularities can share one, which would count the same rewards twice and is refused)."""
    lams = tuple(granularities)
    return [e for e in candidates if len({tuple(granularity_grid(num_steps, e, lam)) for lam in lams}) == len(lams)]
