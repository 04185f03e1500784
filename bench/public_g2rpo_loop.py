"""A faithful re-creation of the public G2RPO rollout's loop structure, the baseline of
``bench/test_rollout.py``: batch 1 everywhere, the anchor ODE once, then for every k in M
and every branch the SDE step's forward recomputed, and every granularity continued
separately from the branch (no shared evaluations). Same math as the engine, so the
outputs must agree; only the amount and shape of the work differ.
"""

from __future__ import annotations

import torch

from g2rpo import granularity_grid, ode_step, sde_step_with_logprob, sigma_schedule


@torch.no_grad()
def public_loop_rollout(model, noise, cond, num_steps, sde_indices, granularities, group_size, eta, generator):
    """One prompt (noise ``[1, ...]``, cond ``[1, ...]``) -> (finals [K, J, G, ...], forward rows)."""
    sig = sigma_schedule(num_steps, 3.0)
    rows = 0

    def v(x, i):
        nonlocal rows
        rows += x.shape[0]
        return model(x, torch.full((x.shape[0],), float(sig[i]), dtype=torch.float32), cond)

    x = noise.float()
    anchor = [x]
    for i in range(num_steps):
        x = ode_step(v(x, i), x, sig, i, i + 1)
        anchor.append(x)
    finals = []
    for e in sde_indices:
        eps = torch.randn((group_size, *noise.shape[1:]), generator=generator)  # the engine's draw order
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
