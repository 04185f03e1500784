"""Scoring a rollout's transitions: the new log-probs of a :class:`TrainingUnit` (ONE forward per prompt
and source state), the old log-probs recomputed in the training layout, and the training work list.

Used by the trainer (``g2rpo.train.update``) and by the drop-in (``g2rpo.pipelines.unit_log_probs``). For
G2RPO a unit's source is the shared ``x_k``: its velocity scores all G branches leaving it through the fused
log-prob op (:mod:`g2rpo.ops`) without copying it. The log-prob is the Gaussian log-density of the SDE step
averaged over non-batch dims (Eq. 8, as Flow-GRPO and DanceGRPO reduce it).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .. import ops
from ..schedule import model_timesteps
from ..sde import sde_coefficients, sde_step_with_logprob
from .engine import Rollout, gather_cond
from .units import TrainingUnit, training_units

__all__ = ["Recomputed", "Scored", "TrainingUnit", "training_units", "recompute_old_logprobs", "score_unit", "source_rows",
           "unit_forward_rows", "work_units"]


class Scored(NamedTuple):
    """New log-probs of a unit's selected transitions, row-major over (prompt, branch); the step's Gaussian
    mean and std only when asked for (the KL term)."""

    log_prob: torch.Tensor
    mean: torch.Tensor | None
    std: torch.Tensor | None


class Recomputed(NamedTuple):
    log_probs: torch.Tensor  # [P, K, G]
    forward_rows: int


def source_rows(rollout: Rollout, slot: int) -> int:
    """Distinct source states (forward rows per prompt) of transition slot ``slot``."""
    return int(torch.unique(rollout.source_of[slot]).numel())


def work_units(step: torch.Tensor, prompts_per_forward: int, slots: list[int] | None = None) -> list[TrainingUnit]:
    """The training forwards of one optimizer step ``[P, K, G]``: per trained slot, chunks of prompts.

    With ``slots`` (the slots the step trains on *any* rank) every rank gets the same units in the same
    order, an all-False mask marking a unit with nothing to train here: its forward still runs (FSDP's
    collectives need every rank to make the same forwards) and contributes zero."""
    P, K, _ = step.shape
    units = []
    for slot in range(K) if slots is None else slots:
        for lo in range(0, P, prompts_per_forward):
            rows = slice(lo, min(P, lo + prompts_per_forward))
            sub = step[rows, slot]
            if sub.any() or slots is not None:
                units.append(TrainingUnit(slot, rows, None if bool(sub.all()) else sub))
    return units


def score_unit(policy, rollout: Rollout, unit: TrainingUnit, cond: Any, *, quantize_timesteps: bool = False,
               backend: str = "auto", need_mean: bool = False) -> Scored:
    """New log-probs of a unit's transitions (differentiable), ONE forward per (prompt, source state) that a
    selected transition leaves from."""
    ro, k, rows = rollout, unit.slot, unit.rows
    src_of = ro.source_of[k].to(ro.x_k.device)  # [G]
    G = src_of.numel()
    e = int(ro.step_index[k])
    Pc = rows.stop - rows.start
    dev = ro.x_k.device
    sel = unit.selection(G).to(dev)
    shared = bool((src_of == src_of[0]).all())
    if shared and unit.mask is None and not need_mean:  # G2RPO: one x_k and one v_k per prompt, fused op
        x_src = ro.x_k[rows, int(src_of[0])]  # [Pc, ...]
        v = _velocity(policy, ro, e, x_src, torch.arange(rows.start, rows.stop, device=dev), cond, quantize_timesteps)
        a, b, std = sde_coefficients(ro.sigmas, e, ro.eta, ro.sde_kind)
        x_next = ro.x_next[rows, k]  # [Pc, G, ...]
        logp = torch.stack([ops.logprob(x_src[p][None], x_next[p], v[p][None], a, b, std, backend)
                            for p in range(Pc)])
        return Scored(logp.reshape(-1), None, None)
    # the (prompt, source) pairs the selected transitions leave from: one forward row each
    S = ro.x_k.shape[1]
    need = torch.zeros(Pc, S, dtype=torch.bool, device=dev)
    tp, tg = sel.nonzero(as_tuple=True)
    need[tp, src_of[tg]] = True
    pp, ss = need.nonzero(as_tuple=True)
    x_src = ro.x_k[rows.start + pp, ss]  # [n, ...]
    v = _velocity(policy, ro, e, x_src, rows.start + pp, cond, quantize_timesteps)
    row_of = torch.full((Pc, S), -1, dtype=torch.long, device=dev)
    row_of[pp, ss] = torch.arange(pp.numel(), device=dev)
    r = row_of[tp, src_of[tg]]
    x_next = ro.x_next[rows.start + tp, k, tg]  # [n_sel, ...]
    if need_mean:
        _, logp, mean, std = sde_step_with_logprob(v[r], x_src[r], ro.sigmas, e, ro.eta, prev_sample=x_next,
                                                   kind=ro.sde_kind)
        return Scored(logp, mean, std)
    a, b, std = sde_coefficients(ro.sigmas, e, ro.eta, ro.sde_kind)
    return Scored(ops.logprob(x_src[r], x_next, v[r], a, b, std, backend), None, None)


def _velocity(policy, ro: Rollout, e: int, x: torch.Tensor, prompt_of_row: torch.Tensor, cond: Any,
              quantize_timesteps: bool) -> torch.Tensor:
    sigma = ro.sigmas[e].to(device=x.device, dtype=torch.float32).expand(x.shape[0])
    return policy(x, model_timesteps(sigma, quantize_timesteps), gather_cond(cond, prompt_of_row))


@torch.no_grad()
def recompute_old_logprobs(policy, rollout: Rollout, steps_units: list[list[TrainingUnit]], cond: Any, *,
                           quantize_timesteps: bool = False, backend: str = "auto") -> Recomputed:
    """The old log-probs ``[P, K, G]`` recomputed with the training layout's forwards (the same units
    as the update makes, each transition at its first unit), so that batch-shape-dependent kernels
    cannot move the first ratio off 1. Transitions not trained keep the rollout's values."""
    old = rollout.log_probs.clone()
    G = old.shape[2]
    done = torch.zeros(old.shape, dtype=torch.bool)
    spent = 0
    for units in steps_units:
        for unit in units:
            k, rows = unit.slot, unit.rows
            sel = unit.selection(G)
            fresh = sel & ~done[rows, k]
            if unit.empty:  # the same forwards on every rank (FSDP), nothing to store; their rows are spent too
                score_unit(policy, rollout, unit.everything(), cond, quantize_timesteps=quantize_timesteps,
                           backend=backend)
                spent += unit_forward_rows(rollout, unit.everything())
                continue
            logp = score_unit(policy, rollout, unit, cond, quantize_timesteps=quantize_timesteps,
                              backend=backend).log_prob
            flat = torch.zeros(sel.shape, dtype=old.dtype, device=old.device)
            flat[sel.to(old.device)] = logp.to(old.dtype)
            block = old[rows, k]
            block[fresh.to(old.device)] = flat[fresh.to(old.device)]
            old[rows, k] = block
            done[rows, k] |= fresh
            spent += unit_forward_rows(rollout, unit)
    return Recomputed(old, spent)


def unit_forward_rows(rollout: Rollout, unit: TrainingUnit) -> int:
    """Forward rows of a unit: distinct (prompt, source) pairs of its selected transitions."""
    src = rollout.source_of[unit.slot].cpu()
    sel = unit.selection(src.numel())
    return sum(int(torch.unique(src[row.cpu()]).numel()) for row in sel if row.any())
