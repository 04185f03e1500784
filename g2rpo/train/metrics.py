"""Metrics of an iteration: how each is reduced over ranks, the advantages' statistics, the update's summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..distributed import DistContext

__all__ = ["COST_KEYS", "REDUCE", "CostMeter", "UpdateStats", "advantage_stats", "iteration_cost", "reward_metrics",
           "FallbackCounter", "reduce_ops", "update_metrics"]

#: How a metric is reduced over ranks (default: the mean).
REDUCE = {"ratio_min": "min", "ratio_max": "max", "ratio_first_max_dev": "max", "ratio_last_step_max_dev": "max",
          "adv_abs_max": "max", "adv_mean": "max", "adv_std": "max", "forward_rows": "sum", "time_rollout": "max",
          "time_reward": "max", "time_train": "max", "time_iteration": "max", "recompute_forward_rows": "sum",
          "old_logprob_max_dev": "max", "cost/rollout_rows": "sum", "cost/recompute_rows": "sum",
          "cost/train_rows": "sum", "cost/reference_rows": "sum"}

#: The per-iteration cost metrics that accumulate over a run: rows as ``cost/total/<name>``, the phases' seconds
#: (``time_rollout``, ``time_reward`` = decode + score, ``time_train`` = the update) as ``time_total/<phase>``.
COST_KEYS = {"cost/rollout_rows": "cost/total/rollout_rows", "cost/recompute_rows": "cost/total/recompute_rows",
             "cost/train_rows": "cost/total/train_rows", "cost/reference_rows": "cost/total/reference_rows",
             "time_rollout": "time_total/rollout", "time_reward": "time_total/score", "time_train": "time_total/update"}


def iteration_cost(m: dict[str, float], gradient_checkpointing: bool) -> float:
    """The iteration's cost in forward-row equivalents: every forward row (rollout, recomputed old log-probs,
    reference) counts 1, every row through forward and backward 3 (4 with gradient checkpointing, which runs
    the forward again in the backward). Model-independent: multiply by one row's forward FLOPs for FLOPs."""
    forward = m["cost/rollout_rows"] + m["cost/recompute_rows"] + m["cost/reference_rows"]
    return forward + (4.0 if gradient_checkpointing else 3.0) * m["cost/train_rows"]


class CostMeter:
    """The run's cumulative cost (a checkpointed component: a ``max_cost`` budget survives ``--resume``)."""

    def __init__(self, gradient_checkpointing: bool) -> None:
        self.gradient_checkpointing = gradient_checkpointing
        self.totals: dict[str, float] = {}

    @property
    def cost(self) -> float:
        """Forward-row equivalents so far."""
        return self.totals.get("cost", 0.0)

    def add(self, m: dict[str, float]) -> None:
        """Add an iteration's (reduced) metrics ``m`` and log both into it: ``cost/iteration`` and the cumulative
        ``cost`` in forward-row equivalents (:func:`iteration_cost`), ``cost/total/*`` (rows), ``time_total/*`` (s)."""
        m["cost/iteration"] = iteration_cost(m, self.gradient_checkpointing)
        self.totals["cost"] = self.cost + m["cost/iteration"]
        for key, total in COST_KEYS.items():
            self.totals[total] = self.totals.get(total, 0.0) + m[key]
        m.update(self.totals)

    def state_dict(self) -> dict[str, Any]:
        return {"totals": dict(self.totals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals = {k: float(v) for k, v in state["totals"].items()}


class FallbackCounter:
    """A served judge's answers without a score (scored its fallback), ``reward_fallbacks/<name>``: counted per
    iteration on each rank (:meth:`new`), summed over ranks (:func:`reduce_ops`) and over the run (:meth:`add`;
    checkpointed, so a resumed run goes on counting)."""

    PREFIX = "reward_fallbacks/"

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._seen: dict[str, int] = {}  # this process's counts read so far

    def new(self, rewards: list[tuple[str, Any, float]]) -> dict[str, float]:
        """This rank's fallbacks since the last call, per reward that counts them."""
        out = {}
        for name, model, _ in rewards:
            count = getattr(getattr(model, "model", model), "fallbacks", None)
            if count is not None:
                out[self.PREFIX + name] = float(count - self._seen.get(name, 0))
                self._seen[name] = int(count)
        return out

    def add(self, m: dict[str, float]) -> None:
        """Turn the (rank-summed) new fallbacks in ``m`` into the run's totals."""
        for key in [k for k in m if k.startswith(self.PREFIX)]:
            self.totals[key] = self.totals.get(key, 0.0) + m[key]
            m[key] = self.totals[key]

    def state_dict(self) -> dict[str, Any]:
        return {"totals": dict(self.totals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals = {k: float(v) for k, v in state["totals"].items()}


def reduce_ops(m: dict[str, float]) -> dict[str, str]:
    """How each metric of ``m`` reduces over ranks: :data:`REDUCE`, and counts (``reward_fallbacks/*``) summed."""
    return {**REDUCE, **{k: "sum" for k in m if k.startswith(FallbackCounter.PREFIX)}}


@dataclass
class UpdateStats:
    """What the optimizer steps of one iteration measured (reduced to metrics by :func:`update_metrics`)."""

    ratios: list[torch.Tensor] = field(default_factory=list)
    clipped: list[torch.Tensor] = field(default_factory=list)
    kls: list[torch.Tensor] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    step_max_devs: list[float] = field(default_factory=list)
    first_max_dev: float | None = None
    loss_sum: float = 0.0
    loss_count: int = 0
    trained_slots: int = 0
    optimizer_steps: int = 0
    train_rows: int = 0  # rows through forward + backward (one per prompt and source state of each unit)
    reference_rows: int = 0  # no-grad forwards of the reference policy (the KL term)
    extra: dict[str, float] = field(default_factory=dict)


def advantage_stats(adv: torch.Tensor, ctx: DistContext) -> dict[str, float]:
    """Mean, std and max |.| of the advantages over every rank (not a mean of per-rank stds)."""
    a = adv.double().flatten().cpu()
    stats = ctx.all_reduce_sum(torch.tensor([a.sum().item(), (a * a).sum().item(), float(a.numel())],
                                            dtype=torch.float64))
    s1, s2, n = stats.tolist()
    if n == 0:
        return {"adv_mean": 0.0, "adv_std": 0.0, "adv_abs_max": 0.0}
    var = max(0.0, s2 - s1 * s1 / n) / max(1.0, n - 1)
    return {"adv_mean": s1 / n, "adv_std": var ** 0.5, "adv_abs_max": float(a.abs().max()) if a.numel() else 0.0}


def update_metrics(stats: UpdateStats, kl: bool) -> dict[str, float]:
    """This rank's update metrics; the same keys on every rank even when it trained nothing."""
    kl_metric = {"kl": float(torch.cat(stats.kls).mean()) if stats.kls else 0.0} if kl else {}
    common = {"grad_norm": float(np.mean(stats.grad_norms)) if stats.grad_norms else 0.0,
              "cost/train_rows": float(stats.train_rows), "cost/reference_rows": float(stats.reference_rows),
              "trained_steps": float(stats.trained_slots), "optimizer_steps": float(stats.optimizer_steps),
              **stats.extra, **kl_metric}
    if not stats.ratios:  # nothing trained here (e.g. an empty MixGRPO window)
        return {"ratio_mean": 1.0, "ratio_min": 1.0, "ratio_max": 1.0, "ratio_first_max_dev": 0.0,
                "ratio_last_step_max_dev": 0.0, "clip_frac": 0.0, "loss": 0.0, **common}
    r = torch.cat(stats.ratios)
    return {"ratio_mean": float(r.mean()), "ratio_min": float(r.min()), "ratio_max": float(r.max()),
            "ratio_first_max_dev": stats.first_max_dev, "ratio_last_step_max_dev": stats.step_max_devs[-1],
            "clip_frac": float(torch.cat(stats.clipped).mean()), "loss": stats.loss_sum / stats.loss_count, **common}


def reward_metrics(rewards: list[tuple[str, Any, float]], scores: torch.Tensor, granularities) -> dict[str, float]:
    """Per reward (``[(name, model, weight)]``, scores ``[R, P, K', J, G]``): its mean ``reward/<name>`` and its
    mean at each granularity ``reward/<name>/lambda<l>``."""
    m = {}
    for r, (name, _, _) in enumerate(rewards):
        m[f"reward/{name}"] = float(scores[r].mean())
        for j, lam in enumerate(granularities):
            m[f"reward/{name}/lambda{lam}"] = float(scores[r, :, :, j].mean())
    return m
