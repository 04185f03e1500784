"""The policy update of one iteration, as a component: :class:`PolicyUpdate`.

Built from the set-up (the policy, its trained module and parameters, the reference), the optimizer, the
LR schedule, the EMA and the config. :meth:`PolicyUpdate.step` runs the iteration's optimizer steps
(:func:`optimizer_steps`: which transitions each step trains); :meth:`PolicyUpdate.forward_backward` runs
one work unit: new log-probs at the unit's source states (:mod:`g2rpo.rollout.scoring`, ONE forward per
prompt and source state), the clipped surrogate (Eq. 12) and the optional KL, and the backward. The old
log-probs are recomputed in the training layout in low precision. Gradients are clipped, the weights are
checked finite after every step, the EMA follows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..config import TrainConfig
from ..distributed import DistContext, is_fsdp
from ..loss import clipped_surrogate, gaussian_kl
from ..rollout import Rollout
from ..rollout.scoring import (TrainingUnit, recompute_old_logprobs, score_unit, source_rows, unit_forward_rows,
                               work_units)
from .metrics import UpdateStats, update_metrics
from .setup import PolicySetup, ema_decay_at, reference_policy, seed_of, update_ema

__all__ = ["PolicyUpdate", "TrainingError", "optimizer_steps"]


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite reward, loss, gradient or weights); the last checkpoint is intact."""


def optimizer_steps(mask: torch.Tensor, schedule: str, minibatches: int, sample_minibatches: int,
                    inner_epochs: int, generator: torch.Generator | None = None,
                    shuffle_samples: bool = False) -> list[torch.Tensor]:
    """The optimizer steps of one iteration, each the mask ``[P, K, G]`` of the transitions it trains (P: every
    prompt of the iteration, over all ranks).

    ``per_iteration``: the trained slots (shuffled when there are several epochs or minibatches) in
    ``minibatches`` groups; ``per_sde_step``: one group per trained slot, in order. Each group is split further
    into ``sample_minibatches`` steps, step s taking the s-th contiguous part of EVERY prompt's group of samples
    (gradient accumulation over samples: DanceGRPO and MixGRPO, one prompt per rank, accumulate exactly so).
    ``shuffle_samples``: each epoch the P x G samples are permuted before a contiguous split (Flow-GRPO's
    ``torch.randperm``). Nothing depends on the number of ranks: N ranks train exactly as 1.
    """
    P, K, G = mask.shape
    slots = [k for k in range(K) if bool(mask[:, k].any())]
    steps = []
    for _ in range(inner_epochs):
        if shuffle_samples:
            order = torch.randperm(P * G, generator=generator)
            chunks = [c for c in order.tensor_split(sample_minibatches)]
        else:  # part s of every prompt's branches
            chunks = [(torch.arange(P)[:, None] * G + part[None, :]).flatten()
                      for part in torch.arange(G).tensor_split(sample_minibatches)]
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


class PolicyUpdate:
    """The update: ``step`` (one iteration's optimizer steps) and ``forward_backward`` (one work unit)."""

    def __init__(self, cfg: TrainConfig, setup: PolicySetup, optimizer: torch.optim.Optimizer, scheduler: Any,
                 ema: dict[str, torch.Tensor] | None, ctx: DistContext, autocast: Callable[[], Any]) -> None:
        self.cfg, self.setup, self.ctx, self.autocast = cfg, setup, ctx, autocast
        self.optimizer, self.scheduler, self.ema = optimizer, scheduler, ema
        self.optimizer_steps_done = 0  # over the run (checkpointed): the EMA's schedule reads it

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the update besides the (sharded) weights, optimizer moments and EMA: the
        optimizer steps done and the LR schedule's position."""
        return {"optimizer_steps_done": self.optimizer_steps_done, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer_steps_done = int(state["optimizer_steps_done"])
        self.scheduler.load_state_dict(state["scheduler"])

    # ---- checks ----------------------------------------------------------------------------------
    def check_finite_params(self, iteration: int, when: str, prompts: list[str] | None = None) -> None:
        """Stop (on every rank) if any trained parameter is NaN/inf."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.setup.params]
        bad = sum(int(not torch.isfinite(p.detach()).all()) for p in local)
        total = self.ctx.all_reduce_sum(torch.tensor([float(bad)]))
        if float(total[0]):
            names = [n for n, p in self.setup.module.named_parameters() if p.requires_grad]
            first = next((n for n, p in zip(names, local) if not torch.isfinite(p.detach()).all()), "on another rank")
            where = f"; prompts {prompts}" if prompts is not None else ""
            raise TrainingError(f"iteration {iteration}: non-finite parameters {when} ({int(total[0])} tensors, "
                                f"first: {first}){where}; no checkpoint is written with them, the last one is intact")

    # ---- one unit ----------------------------------------------------------------------------------
    def new_log_probs(self, rollout: Rollout, unit: TrainingUnit, cond: Any, need_mean: bool = False):
        return score_unit(self.setup.policy, rollout, unit, cond, quantize_timesteps=self.cfg.sampler.quantize_timesteps,
                          backend=self.cfg.ops_backend, need_mean=need_mean)

    def forward_backward(self, rollout: Rollout, unit: TrainingUnit, old_log_probs: torch.Tensor,
                         adv: torch.Tensor, cond: Any, n_total: float, stats: UpdateStats, iteration: int,
                         prompts: list[str]) -> None:
        """The clipped surrogate (and KL) of one unit, divided by ``n_total`` (the step's transitions over all
        ranks / ranks: FSDP averages gradients), backpropagated. An empty unit still runs its forward (every
        rank makes the same forwards under FSDP) and contributes zero."""
        cfg = self.cfg
        G = rollout.log_probs.shape[2]
        k, rows = unit.slot, unit.rows
        run = unit.everything() if unit.empty else unit
        selected = run.selection(G).to(old_log_probs.device)
        with self.autocast():
            scored = self.new_log_probs(rollout, run, cond, need_mean=cfg.loss.kl_beta > 0)
        forward_rows = unit_forward_rows(rollout, run)
        stats.train_rows += forward_rows
        surrogate = clipped_surrogate(scored.log_prob, old_log_probs[rows, k][selected],
                                      adv[rows, k][selected.to(adv.device)], cfg.loss.clip_range, cfg.loss.adv_clip_max)
        loss = surrogate.loss.sum() / n_total
        if cfg.loss.kl_beta > 0:
            with reference_policy(self.setup, cfg.lora.enabled), self.autocast():
                reference_mean = self.new_log_probs(rollout, run, cond, need_mean=True).mean
            stats.reference_rows += forward_rows
            kl = gaussian_kl(scored.mean, reference_mean, scored.std)
            if cfg.loss.kl_convention == "flow_grpo":  # Flow-GRPO divides by 2 sigma_t^2, not 2 sigma_t^2 |dt|
                e = int(rollout.step_index[k])
                kl = kl * float(rollout.sigmas[e] - rollout.sigmas[e + 1])
            loss = loss + cfg.loss.kl_beta * kl.sum() / n_total
            if not unit.empty:
                stats.kls.append(kl.detach())
        if unit.empty:  # nothing to train on this rank: the forward ran for FSDP's collectives
            (loss * 0.0).backward()
            return
        if not torch.isfinite(loss):
            bad_rows = selected.nonzero()[:, 0][~torch.isfinite(surrogate.loss)].unique().tolist()
            bad = sorted({prompts[rows.start + i] for i in bad_rows})
            raise TrainingError(f"iteration {iteration + 1}: non-finite loss at SDE step "
                                f"{int(rollout.step_index[k])} for prompts {bad}")
        loss.backward()
        if stats.first_max_dev is None:
            stats.first_max_dev = float((surrogate.ratio - 1).abs().max())
        stats.ratios.append(surrogate.ratio.detach().flatten())
        stats.clipped.append(surrogate.clipped.flatten().float())
        stats.loss_sum += float(loss.detach()) * n_total
        stats.loss_count += surrogate.loss.numel()

    # ---- one iteration -------------------------------------------------------------------------------
    def train(self, rollout: Rollout, adv: torch.Tensor, cond: Any, iteration: int, prompts: list[str], strategy,
              plan) -> dict[str, float]:
        """One iteration's update: the strategy's trained transitions are drawn for the GLOBAL batch (the same on
        every rank, the same as on one rank; samples whose advantage is zero at every step leave it with
        ``loss.skip_zero_advantage``), then :meth:`step` slices them to this rank."""
        cfg, ctx = self.cfg, self.ctx
        generator = torch.Generator().manual_seed(seed_of(cfg.seed, iteration, 2))
        P = rollout.log_probs.shape[0]
        global_mask = strategy.train_mask(plan, P * ctx.world, generator)
        if cfg.loss.skip_zero_advantage:  # Flow-GRPO's mask = advantages.abs().sum(dim=1) != 0
            zero = torch.zeros(P * ctx.world, adv.shape[2], dtype=torch.float64)
            lo = ctx.rank * P
            zero[lo:lo + P] = (adv.abs().sum(dim=1) == 0).double().cpu()
            zero = ctx.all_reduce_sum(zero) > 0
            global_mask = global_mask & ~zero[:, None, :]
        return self.step(rollout, adv, cond, iteration, prompts, global_mask, generator)

    def step(self, rollout: Rollout, adv: torch.Tensor, cond: Any, iteration: int, prompts: list[str],
             global_mask: torch.Tensor, generator: torch.Generator) -> dict[str, float]:
        """The optimizer steps of iteration ``iteration`` (0-based) on this rank's ``rollout``. ``global_mask
        [P * ranks, K, G]`` (the strategy's trained transitions, drawn for the global batch, the same on every
        rank) is split into optimizer steps and sliced to this rank's prompts, so that every rank makes the
        same forwards (FSDP). Returns this rank's metrics."""
        cfg, world = self.cfg, self.ctx.world
        P, K, G = rollout.log_probs.shape
        lo = self.ctx.rank * P
        global_steps = optimizer_steps(global_mask, cfg.optim.update_schedule, cfg.minibatches,
                                       cfg.optim.sample_minibatches, cfg.inner_epochs, generator,
                                       shuffle_samples=cfg.optim.shuffle_samples)
        mask = global_mask[lo:lo + P]
        steps = [s[lo:lo + P] for s in global_steps]
        trained = [k for k in range(K) if bool(global_mask[:, k].any())]
        widest = max([source_rows(rollout, k) for k in trained] or [1])
        prompts_per_forward = max(1, cfg.train_batch // widest)
        steps_units = [work_units(m, prompts_per_forward, [k for k in range(K) if bool(g[:, k].any())]
                                  if world > 1 else None) for m, g in zip(steps, global_steps)]
        stats = UpdateStats(trained_slots=len(trained), optimizer_steps=len(steps))
        module = self.setup.module
        module.train()
        old_log_probs = rollout.log_probs
        recompute = cfg.loss.recompute_old_logprob
        if recompute == "auto":
            recompute = self.setup.compute_dtype != torch.float32
        if recompute and steps:
            with self.autocast():
                old_log_probs, spent = recompute_old_logprobs(self.setup.policy, rollout, steps_units, cond,
                                                              quantize_timesteps=cfg.sampler.quantize_timesteps,
                                                              backend=cfg.ops_backend)
            dev = (old_log_probs - rollout.log_probs)[mask.to(old_log_probs.device)].abs()
            stats.extra = {"recompute_forward_rows": float(spent),
                           "old_logprob_max_dev": float(dev.max()) if dev.numel() else 0.0}
        for global_step, units in zip(global_steps, steps_units):
            n_total = int(global_step.sum()) / world  # FSDP averages the ranks' gradients: sum / n over all ranks
            self.optimizer.zero_grad(set_to_none=True)
            before = len(stats.ratios)
            for w, unit in enumerate(units):
                if is_fsdp(module):
                    module.set_requires_gradient_sync(w == len(units) - 1)
                self.forward_backward(rollout, unit, old_log_probs, adv, cond, n_total, stats, iteration, prompts)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.setup.params, cfg.optim.max_grad_norm)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if not math.isfinite(grad_norm):
                raise TrainingError(f"iteration {iteration + 1}: non-finite gradient norm ({grad_norm}); "
                                    f"prompts {prompts}")
            stats.grad_norms.append(grad_norm)
            self.optimizer.step()
            self.check_finite_params(iteration + 1, "after the optimizer step", prompts)
            self.optimizer_steps_done += 1
            update_ema(self.ema, module, ema_decay_at(cfg, self.optimizer_steps_done))
            if len(stats.ratios) > before:
                stats.step_max_devs.append(float((torch.cat(stats.ratios[before:]) - 1).abs().max()))
        self.scheduler.step()
        return update_metrics(stats, kl=cfg.loss.kl_beta > 0)
