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

__all__ = ["Unit", "is_empty", "optimizer_steps", "recompute_old_logprobs", "selection", "slot_logprob", "source_rows", "work_units"]


def source_rows(ro: Rollout, k: int) -> int:
    """Number of distinct source states (forward rows per prompt) of transition slot ``k``."""
    return int(torch.unique(ro.source_of[k]).numel())


Unit = tuple[int, slice, "torch.Tensor | None"]  # (slot k, prompt rows, branch mask [Pc, G] or None = all)


def optimizer_steps(mask: torch.Tensor, schedule: str, minibatches: int, sample_minibatches: int,
                    inner_epochs: int, generator: torch.Generator | None = None, ranks: int = 1) -> list[torch.Tensor]:
    """The optimizer steps of one iteration, each the mask ``[P, K, G]`` of the transitions it trains.

    ``per_iteration``: the trained slots (shuffled when there are several epochs or minibatches) in
    ``minibatches`` groups; ``per_sde_step``: one group per trained slot, in order. Each group is
    split further into ``sample_minibatches`` steps: every rank's ``P / ranks * G`` samples (prompt-major)
    in contiguous chunks, step s taking the s-th chunk of every rank (gradient accumulation over
    samples on each rank, as DanceGRPO and MixGRPO accumulate).
    """
    P, K, G = mask.shape
    slots = [k for k in range(K) if bool(mask[:, k].any())]
    per_rank = (P // ranks) * G
    local = torch.arange(per_rank).tensor_split(sample_minibatches)
    chunks = [torch.cat([c + r * per_rank for r in range(ranks)]) for c in local]
    steps = []
    for _ in range(inner_epochs):
        if schedule == "per_sde_step":
            groups = [[k] for k in slots]
        else:
            order = slots
            if inner_epochs > 1 or minibatches > 1:
                order = [slots[i] for i in torch.randperm(len(slots), generator=generator).tolist()]
            groups = [order[i::minibatches] for i in range(minibatches) if order[i::minibatches]]
        for group in groups:
            in_group = torch.zeros(1, K, 1, dtype=torch.bool)
            in_group[0, group] = True
            for chunk in chunks:
                in_chunk = torch.zeros(P * G, dtype=torch.bool)
                in_chunk[chunk] = True
                m = mask & in_group & in_chunk.view(P, 1, G)
                if m.any():
                    steps.append(m)
    return steps


def work_units(step: torch.Tensor, prompts_per_forward: int, slots: list[int] | None = None) -> list[Unit]:
    """The training forwards of one optimizer step: per trained slot, chunks of prompts.

    With ``slots`` (the slots the step trains on *any* rank) every rank gets the same units in the same
    order, an all-False mask marking a unit with nothing to train here: its forward still runs (FSDP's
    collectives need every rank to make the same forwards) and contributes zero."""
    P, K, _ = step.shape
    units = []
    for k in range(K) if slots is None else slots:
        for lo in range(0, P, prompts_per_forward):
            rows = slice(lo, min(P, lo + prompts_per_forward))
            sub = step[rows, k]
            if sub.any() or slots is not None:
                units.append((k, rows, None if bool(sub.all()) else sub))
    return units


def is_empty(unit: Unit) -> bool:
    """A unit that trains nothing on this rank (run for its collectives only)."""
    return unit[2] is not None and not bool(unit[2].any())


def selection(unit: Unit, num_branches: int) -> torch.Tensor:
    """The ``[Pc, G]`` mask of the transitions a unit trains."""
    _, rows, sub = unit
    return sub if sub is not None else torch.ones(rows.stop - rows.start, num_branches, dtype=torch.bool)


def slot_logprob(policy, ro: Rollout, k: int, rows: slice, cond: Any, *, mask: torch.Tensor | None = None,
                 quantize_timesteps: bool = False, backend: str = "auto", need_mean: bool = False):
    """New ``(log_prob, mean, std)`` of transitions ``(p in rows, k, g)`` (Eq. 8: the Gaussian log-density
    of the SDE step averaged over non-batch dims), flattened in row-major order over the selected
    ``(p, g)`` of ``mask [Pc, G]`` (all when None). ``mean``/``std`` only with ``need_mean`` (KL).

    ONE forward per (prompt, source state) that a selected transition leaves from.
    """
    src_of = ro.source_of[k].to(ro.x_k.device)  # [G]
    G = src_of.numel()
    e = int(ro.step_index[k])
    Pc = rows.stop - rows.start
    dev = ro.x_k.device
    sel = torch.ones(Pc, G, dtype=torch.bool, device=dev) if mask is None else mask.to(dev)
    shared = bool((src_of == src_of[0]).all())
    if shared and mask is None and not need_mean:  # G2RPO: one x_k and one v_k per prompt, fused op
        x_src = ro.x_k[rows, int(src_of[0])]  # [Pc, ...]
        v = _velocity(policy, ro, e, x_src, torch.arange(rows.start, rows.stop, device=dev), cond, quantize_timesteps)
        a, b, std = sde_coefficients(ro.sigmas, e, ro.eta, ro.sde_kind)
        x_next = ro.x_next[rows, k]  # [Pc, G, ...]
        logp = torch.stack([ops.logprob(x_src[p][None], x_next[p], v[p][None], a, b, std, backend)
                            for p in range(Pc)])
        return logp.reshape(-1), None, None
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
        return logp, mean, std
    a, b, std = sde_coefficients(ro.sigmas, e, ro.eta, ro.sde_kind)
    return ops.logprob(x_src[r], x_next, v[r], a, b, std, backend), None, None


def _velocity(policy, ro: Rollout, e: int, x: torch.Tensor, prompt_of_row: torch.Tensor, cond: Any,
              quantize_timesteps: bool) -> torch.Tensor:
    sigma = ro.sigmas[e].to(device=x.device, dtype=torch.float32).expand(x.shape[0])
    return policy(x, model_timesteps(sigma, quantize_timesteps), gather_cond(cond, prompt_of_row))


@torch.no_grad()
def recompute_old_logprobs(policy, ro: Rollout, steps_units: list[list[Unit]], cond: Any, *,
                           quantize_timesteps: bool = False, backend: str = "auto") -> tuple[torch.Tensor, int]:
    """The old log-probs ``[P, K, G]`` recomputed with the training layout's forwards (the same units
    as the update makes, each transition at its first unit), so that batch-shape-dependent kernels
    cannot move the first ratio off 1. Transitions not trained keep the rollout's values. Returns
    (old log-probs, forward rows spent)."""
    old = ro.log_probs.clone()
    G = old.shape[2]
    done = torch.zeros(old.shape, dtype=torch.bool)
    spent = 0
    for units in steps_units:
        for unit in units:
            k, rows, sub = unit
            sel = selection(unit, G)
            fresh = sel & ~done[rows, k]
            if is_empty(unit):  # the same forwards on every rank (FSDP), nothing to store
                slot_logprob(policy, ro, k, rows, cond, quantize_timesteps=quantize_timesteps, backend=backend)
                continue
            logp, _, _ = slot_logprob(policy, ro, k, rows, cond, mask=sub, quantize_timesteps=quantize_timesteps,
                                      backend=backend)
            flat = torch.zeros(sel.shape, dtype=old.dtype, device=old.device)
            flat[sel.to(old.device)] = logp.to(old.dtype)
            block = old[rows, k]
            block[fresh.to(old.device)] = flat[fresh.to(old.device)]
            old[rows, k] = block
            done[rows, k] |= fresh
            spent += _forward_rows(ro, k, sel)
    return old, spent


def _forward_rows(ro: Rollout, k: int, sel: torch.Tensor) -> int:
    """Forward rows of a unit: distinct (prompt, source) pairs of its selected transitions."""
    src = ro.source_of[k].cpu()
    return sum(int(torch.unique(src[row.cpu()]).numel()) for row in sel if row.any())
