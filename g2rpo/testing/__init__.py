"""An analytic flow-matching world for tests (importable by users' tests).

Data ``x0 ~ N(mu, s^2 I)`` and noise ``eps ~ N(0, I)`` are mixed along the rectified
flow ``x_t = (1 - t) x0 + t eps``. The marginal of ``x_t`` is
``N((1 - t) mu, (1 - t)^2 s^2 + t^2)`` per coordinate and the exact velocity
``v(x, t) = E[eps - x0 | x_t = x]`` has the closed form (jointly Gaussian variables)::

    v(x, t) = (t - (1 - t) s^2) / ((1 - t)^2 s^2 + t^2) * (x - (1 - t) mu) - mu

so the probability-flow ODE carries N(0, I) at t = 1 exactly onto N(mu, s^2) at t = 0,
and the Flow-GRPO SDE (Eq. 2-3) has the same marginals. ``GaussianWorld`` is a velocity
model with the engine's protocol ``model(x, sigma, cond) -> velocity``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schedule import granularity_grid, sigma_schedule
from ..sde import ode_step, sde_step_with_logprob

__all__ = ["PAPER_SETTING", "GaussianWorld", "MLPVelocity", "public_loop_rollout", "sample_ode", "sample_sde",
           "brightness"]

#: The paper's rollout setting (PAPER.md Sec. 5.1): T=16, M = e 0..7, Lambda {1,2,3}, G=12, eta 0.7 (sampler kwargs).
PAPER_SETTING = dict(num_steps=16, sde_indices=tuple(range(8)), granularities=(1, 2, 3), group_size=12, eta=0.7)


@dataclass(frozen=True)
class GaussianWorld:
    """Exact velocity field of Gaussian data N(mu, scale^2 I) under rectified flow."""

    mu: float = 0.5
    scale: float = 0.4

    def marginal(self, t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std (per coordinate) of x_t."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return (1 - t) * self.mu, torch.sqrt((1 - t) ** 2 * self.scale**2 + t**2)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: object = None) -> torch.Tensor:
        t = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
        a = 1.0 - t
        var = a**2 * self.scale**2 + t**2
        v = (t - a * self.scale**2) / var * (x.double() - a * self.mu) - self.mu
        return v.to(x.dtype)


def sample_ode(model, noise: torch.Tensor, sigmas: torch.Tensor, cond: object = None) -> torch.Tensor:
    """Plain Euler ODE sampling from ``noise`` (at sigmas[0]) to sigmas[-1]; one row at a time is not needed."""
    x = noise.float()
    for i in range(sigmas.numel() - 1):
        sig = sigmas[i].float().expand(x.shape[0])
        x = ode_step(model(x, sig, cond), x, sigmas, i, i + 1)
    return x


def sample_sde(
    model,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    eta: float,
    generator: torch.Generator | None = None,
    cond: object = None,
    kind: str = "flow_grpo",
) -> torch.Tensor:
    """SDE sampling at every step (as Flow-GRPO/DanceGRPO roll out) from ``noise``."""
    x = noise.float()
    for i in range(sigmas.numel() - 1):
        sig = sigmas[i].float().expand(x.shape[0])
        x, _, _, _ = sde_step_with_logprob(model(x, sig, cond), x, sigmas, i, eta, generator=generator, kind=kind)
    return x


class MLPVelocity(torch.nn.Module):
    """A small conditional velocity network ``model(x, sigma, cond)`` for tests and benches.

    ``x [B, ...]`` is flattened; ``cond`` is a tensor ``[B, cond_dim]`` (or None); the output
    has the shape of ``x``. Random weights from ``seed``: a real, nonlinear, batched model.
    """

    def __init__(self, latent_shape: tuple[int, ...], cond_dim: int = 8, hidden: int = 128, seed: int = 0) -> None:
        super().__init__()
        self.latent_shape = tuple(latent_shape)
        self.cond_dim = cond_dim
        d = 1
        for s in latent_shape:
            d *= s
        g = torch.Generator().manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d + 1 + cond_dim, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, d))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        c = torch.zeros(b, self.cond_dim, dtype=x.dtype, device=x.device) if cond is None else cond.to(x.dtype)
        h = torch.cat([x.reshape(b, -1), sigma.reshape(b, 1).to(x.dtype), c], dim=1)
        return self.net(h).reshape(x.shape)


# The public G2RPO rollout's loop structure, the baseline of the rollout benchmarks: batch 1
# everywhere, the anchor ODE once, then for every k in M and every branch the SDE step's
# forward recomputed, and every granularity continued separately from the branch (no
# shared evaluations). Same math as the engine, so the outputs must agree.
@torch.no_grad()
def public_loop_rollout(model, noise, cond, num_steps, sde_indices, granularities, group_size, eta, generator,
                        shift: float = 3.0):
    """One prompt (noise ``[1, ...]``, cond ``[1, ...]``) -> (finals [K, J, G, ...], forward rows)."""
    sig = sigma_schedule(num_steps, shift)
    rows = 0

    def v(x, i):
        nonlocal rows
        rows += x.shape[0]
        return model(x, torch.full((x.shape[0],), float(sig[i]), dtype=torch.float32, device=x.device), cond)

    x = noise.float()
    anchor = [x]
    for i in range(num_steps):
        x = ode_step(v(x, i), x, sig, i, i + 1)
        anchor.append(x)
    finals = []
    for e in sde_indices:
        eps = torch.randn((group_size, *noise.shape[1:]), generator=generator, device=noise.device)  # the engine's draw order
        per_k = [[None] * group_size for _ in granularities]
        for g in range(group_size):
            x_k = anchor[e]
            x_next, _, _, _ = sde_step_with_logprob(v(x_k, e), x_k, sig, e, eta, noise=eps[g:g + 1])
            for j, lam in enumerate(granularities):
                x = x_next
                grid = granularity_grid(num_steps, e, lam)
                for i, nxt in zip(grid, grid[1:]):
                    x = ode_step(v(x, i), x, sig, i, nxt)
                per_k[j][g] = x[0]
        finals.append(torch.stack([torch.stack(gs) for gs in per_k]))
    return torch.stack(finals), rows


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A reward for a first run on a tiny random pipeline, with no weights to download
    (``rewards: [{name: "g2rpo.testing:brightness"}]``): the mean brightness of each image or video."""
    return images.float().mean(dim=tuple(range(1, images.ndim)))
