"""The GRPO update's math (no I/O): new log-probs at the rollout's source states, the old
log-probs recomputed in the training layout, and the work list of one minibatch.

ONE forward per (prompt, source state): for G2RPO the shared ``x_k``, whose velocity scores
all G branches leaving it through the fused log-prob op (:mod:`g2rpo.ops`) without copying it.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import ops
from ..rollout import Rollout, gather_cond
from ..schedule import model_timesteps
from ..sde import sde_coefficients, sde_step_with_logprob

__all__ = ["slot_logprob", "recompute_old_logprobs", "source_rows"]


def source_rows(ro: Rollout, k: int) -> int:
    """Number of distinct source states (forward rows per prompt) of transition slot ``k``."""
    return int(torch.unique(ro.source_of[k]).numel())


def slot_logprob(policy, ro: Rollout, k: int, rows: slice, cond: Any, *, quantize_timesteps: bool = False,
                 backend: str = "auto", need_mean: bool = False):
    """New ``(log_prob [Pc, G], mean, std)`` of transitions ``(p in rows, k, :)`` (Eq. 8; the Gaussian
    log-density of the SDE step averaged over non-batch dims). ``mean``/``std`` only with
    ``need_mean`` (for the KL term)."""
    sources, pos = torch.unique(ro.source_of[k], return_inverse=True)
    x_src = ro.x_k[rows][:, sources.to(ro.x_k.device)]  # [Pc, S, ...]
    Pc, S = x_src.shape[:2]
    shape = x_src.shape[2:]
    e = int(ro.step_index[k])
    sigma = ro.sigmas[e].to(device=x_src.device, dtype=torch.float32).expand(Pc * S)
    prompt_of_row = torch.arange(rows.start, rows.stop, device=x_src.device).repeat_interleave(S)
    v = policy(x_src.reshape(Pc * S, *shape), model_timesteps(sigma, quantize_timesteps),
               gather_cond(cond, prompt_of_row)).view(Pc, S, *shape)
    x_next = ro.x_next[rows, k]  # [Pc, G, ...]
    pos = pos.to(x_src.device)
    if need_mean:
        _, logp, mean, std = sde_step_with_logprob(v[:, pos].reshape(-1, *shape), x_src[:, pos].reshape(-1, *shape),
                                                   ro.sigmas, e, ro.eta, prev_sample=x_next.reshape(-1, *shape),
                                                   kind=ro.sde_kind)
        return logp.view(Pc, -1), mean, std
    a, b, std = sde_coefficients(ro.sigmas, e, ro.eta, ro.sde_kind)
    if S == 1:  # the group shares x_k and v_k: one row of each per prompt
        logp = torch.stack([ops.logprob(x_src[p], x_next[p], v[p], a, b, std, backend) for p in range(Pc)])
    else:
        logp = ops.logprob(x_src[:, pos].reshape(-1, *shape), x_next.reshape(-1, *shape),
                           v[:, pos].reshape(-1, *shape), a, b, std, backend).view(Pc, -1)
    return logp, None, None


@torch.no_grad()
def recompute_old_logprobs(policy, ro: Rollout, slots: list[int], chunk: int, cond: Any, *,
                           quantize_timesteps: bool = False, backend: str = "auto") -> tuple[torch.Tensor, int]:
    """The old log-probs ``[P, K, G]`` of the trained ``slots``, recomputed with the training layout's
    forwards (same rows per call as the update makes), so that batch-shape-dependent kernels cannot
    move the first ratio off 1. Slots not trained keep the rollout's values. Returns (old log-probs,
    forward rows spent)."""
    old = ro.log_probs.clone()
    P = old.shape[0]
    spent = 0
    for k in slots:
        for lo in range(0, P, chunk):
            rows = slice(lo, min(P, lo + chunk))
            logp, _, _ = slot_logprob(policy, ro, k, rows, cond, quantize_timesteps=quantize_timesteps,
                                      backend=backend)
            old[rows, k] = logp.to(old.dtype)
            spent += (rows.stop - rows.start) * source_rows(ro, k)
    return old, spent
