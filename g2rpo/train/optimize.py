"""The optimizer steps of one iteration: which transitions each step trains (:func:`.update.optimizer_steps`),
the old log-probs (recomputed in the training layout in low precision), the clipped surrogate (Eq. 12)
and optional KL per work unit, gradient clipping, the step, the EMA, and the finiteness checks."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..distributed import is_fsdp
from ..loss import clipped_surrogate, gaussian_kl
from ..rollout import Rollout
from .setup import reference_policy, seed_of, update_ema
from .update import (is_empty, optimizer_steps, recompute_old_logprobs, selection, slot_logprob, source_rows,
                     work_units)

if TYPE_CHECKING:
    from .loop import Trainer

__all__ = ["TrainingError", "train_on", "check_finite_params"]


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite reward, loss, gradient or weights); the last checkpoint is intact."""


def check_finite_params(tr: Trainer, iteration: int, when: str, prompts: list[str] | None = None) -> None:
    """Stop (on every rank) if any trained parameter is NaN/inf."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in tr.params]
    bad = sum(int(not torch.isfinite(p.detach()).all()) for p in local)
    total = tr.ctx.all_reduce_sum(torch.tensor([float(bad)]))
    if float(total[0]):
        names = [n for n, p in tr.module.named_parameters() if p.requires_grad]
        first = next((n for n, p in zip(names, local) if not torch.isfinite(p.detach()).all()), "on another rank")
        where = f"; prompts {prompts}" if prompts is not None else ""
        raise TrainingError(f"iteration {iteration}: non-finite parameters {when} ({int(total[0])} tensors, first: "
                            f"{first}){where}; no checkpoint is written with them, the last one is intact")


def _logprob(tr: Trainer, ro: Rollout, unit, cond: Any, need_mean: bool = False):
    k, rows, sub = unit
    return slot_logprob(tr.policy, ro, k, rows, cond, mask=sub, quantize_timesteps=tr.cfg.sampler.quantize_timesteps,
                        backend=tr.cfg.ops_backend, need_mean=need_mean)


def train_on(tr: Trainer, ro: Rollout, adv: torch.Tensor, cond: Any, iteration: int,
             prompts: list[str]) -> dict[str, float]:
    """The policy update of one iteration (``iteration`` 0-based); returns local metrics."""
    cfg = tr.cfg
    gen = torch.Generator().manual_seed(seed_of(cfg.seed, iteration, 2))
    P, K, G = ro.log_probs.shape
    # The mask and the optimizer steps are drawn for the GLOBAL batch (the same on every rank, the same as
    # on one rank) and sliced: every rank then makes the same forwards (FSDP) and N ranks train as 1.
    world, lo = tr.ctx.world, tr.ctx.rank * P
    global_mask = tr.sampler.strategy.train_mask(tr.sampler.plan(iteration), P * world, gen)  # [P * world, K, G]
    global_steps = optimizer_steps(global_mask, cfg.optim.update_schedule, cfg.minibatches,
                                   cfg.optim.sample_minibatches, cfg.inner_epochs, gen, ranks=world)
    mask = global_mask[lo:lo + P]
    steps = [s[lo:lo + P] for s in global_steps]
    trained = [k for k in range(K) if bool(global_mask[:, k].any())]
    S_max = max([source_rows(ro, k) for k in trained] or [1])
    chunk = max(1, cfg.train_batch // S_max)
    steps_units = [work_units(m, chunk, [k for k in range(K) if bool(g[:, k].any())] if world > 1 else None)
                   for m, g in zip(steps, global_steps)]
    ratios, clips, kls, grad_norms, step_devs = [], [], [], [], []
    loss_sum, loss_count, first_dev = 0.0, 0, None
    tr.module.train()
    old_logp, extra = ro.log_probs, {}
    recompute = cfg.loss.recompute_old_logprob
    if recompute == "auto":
        recompute = tr.compute_dtype != torch.float32
    if recompute and steps:
        with tr.autocast():
            old_logp, spent = recompute_old_logprobs(tr.policy, ro, steps_units, cond,
                                                     quantize_timesteps=cfg.sampler.quantize_timesteps,
                                                     backend=cfg.ops_backend)
        dev = (old_logp - ro.log_probs)[mask.to(old_logp.device)].abs()
        extra = {"recompute_forward_rows": float(spent), "old_logprob_max_dev": float(dev.max()) if dev.numel() else 0.0}
    for step, global_step, units in zip(steps, global_steps, steps_units):
        n_total = int(global_step.sum()) / world  # FSDP averages the ranks' gradients: sum / n over all ranks
        tr.optimizer.zero_grad(set_to_none=True)
        step_ratios = []
        for w, unit in enumerate(units):
            k, rows, _ = unit
            sel = selection(unit, G).to(old_logp.device)
            if is_fsdp(tr.module):
                tr.module.set_requires_gradient_sync(w == len(units) - 1)
            run_unit = (k, rows, None) if is_empty(unit) else unit
            with tr.autocast():
                logp, mean, std = _logprob(tr, ro, run_unit, cond, need_mean=cfg.loss.kl_beta > 0)
            if is_empty(unit):
                sel = torch.ones_like(sel)
            sur = clipped_surrogate(logp, old_logp[rows, k][sel], adv[rows, k][sel.to(adv.device)],
                                    cfg.loss.clip_range, cfg.loss.adv_clip_max)
            loss = sur.loss.sum() / n_total
            if cfg.loss.kl_beta > 0:
                with reference_policy(tr.setup, cfg.lora.enabled), tr.autocast():
                    _, ref_mean, _ = _logprob(tr, ro, run_unit, cond, need_mean=True)
                kl = gaussian_kl(mean, ref_mean, std)
                if cfg.loss.kl_convention == "flow_grpo":  # Flow-GRPO divides by 2 sigma_t^2, not 2 sigma_t^2 |dt|
                    e = int(ro.step_index[k])
                    kl = kl * float(ro.sigmas[e] - ro.sigmas[e + 1])
                loss = loss + cfg.loss.kl_beta * kl.sum() / n_total
                if not is_empty(unit):
                    kls.append(kl.detach())
            if is_empty(unit):  # nothing to train on this rank: the forward ran for FSDP's collectives
                (loss * 0.0).backward()
                continue
            if not torch.isfinite(loss):
                bad_rows = sel.nonzero()[:, 0][~torch.isfinite(sur.loss)].unique().tolist()
                bad = sorted({prompts[rows.start + i] for i in bad_rows})
                raise TrainingError(f"iteration {iteration + 1}: non-finite loss at SDE step "
                                    f"{int(ro.step_index[k])} for prompts {bad}")
            loss.backward()
            if first_dev is None:
                first_dev = float((sur.ratio - 1).abs().max())
            step_ratios.append(sur.ratio.flatten())
            clips.append(sur.clipped.flatten().float())
            loss_sum += float(loss.detach()) * n_total
            loss_count += sur.loss.numel()
        gn = torch.nn.utils.clip_grad_norm_(tr.params, cfg.optim.max_grad_norm)
        gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
        if not math.isfinite(gn):
            raise TrainingError(f"iteration {iteration + 1}: non-finite gradient norm ({gn}); prompts {prompts}")
        grad_norms.append(gn)
        tr.optimizer.step()
        check_finite_params(tr, iteration + 1, "after the optimizer step", prompts)
        update_ema(tr.ema, tr.module, cfg.ema_decay)
        ratios += step_ratios
        if step_ratios:
            step_devs.append(float((torch.cat(step_ratios) - 1).abs().max()))
    tr.scheduler.step()
    kl = {"kl": float(torch.cat(kls).mean()) if kls else 0.0} if cfg.loss.kl_beta > 0 else {}
    if not ratios:  # nothing trained here (e.g. an empty MixGRPO window); the same keys on every rank
        return {"ratio_mean": 1.0, "ratio_min": 1.0, "ratio_max": 1.0, "ratio_first_max_dev": 0.0,
                "ratio_last_step_max_dev": 0.0, "clip_frac": 0.0, "loss": 0.0,
                "grad_norm": float(np.mean(grad_norms)) if grad_norms else 0.0, "trained_steps": float(len(trained)),
                "optimizer_steps": float(len(steps)), **extra, **kl}
    r = torch.cat(ratios)
    m = {"ratio_mean": float(r.mean()), "ratio_min": float(r.min()), "ratio_max": float(r.max()),
         "ratio_first_max_dev": first_dev, "ratio_last_step_max_dev": step_devs[-1],
         "clip_frac": float(torch.cat(clips).mean()), "loss": loss_sum / loss_count,
         "grad_norm": float(np.mean(grad_norms)), "trained_steps": float(len(trained)),
         "optimizer_steps": float(len(steps)), **extra, **kl}
    return m
