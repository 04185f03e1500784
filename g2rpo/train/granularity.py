"""The granularities a G2RPO run rolls out: MGAI diagnostics per iteration and ``sampler.auto_granularity_threshold``,
which stops rolling out a granularity that ranks the branches as the finest one does. A stateful component: the
checkpoint holds its :meth:`GranularityController.state_dict`."""

from __future__ import annotations

from typing import Any

import torch

from ..advantage import mgai_diagnostics
from ..config import TrainConfig
from ..rollout import Rollout, RolloutSampler

__all__ = ["GranularityController"]


class GranularityController:
    """Which granularities are still rolled out (``active``) and each one's streak of iterations above the
    threshold; it re-plans ``sampler`` when one is dropped or a checkpoint restores the choice."""

    def __init__(self, cfg: TrainConfig, sampler: RolloutSampler, weights: list[float], log=print) -> None:
        self.cfg, self.sampler, self.weights, self.log = cfg, sampler, weights, log
        self.active: list[int] = list(sampler.strategy.continuation_granularities())
        self.streak: dict[str, int] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"active": list(self.active), "streak": dict(self.streak)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.active, self.streak = list(state["active"]), dict(state["streak"])
        self._apply()

    def _apply(self) -> None:
        """Roll out with the granularities still active."""
        active, strategy = tuple(self.active), self.sampler.strategy
        if active and strategy.continuation_granularities() != active:
            self.sampler.set_strategy(strategy.with_granularities(active))

    def diagnostics(self, rewards: torch.Tensor, rollout: Rollout) -> dict[str, float]:
        """MGAI diagnostics per SDE step e and granularity (:func:`g2rpo.advantage.mgai_diagnostics`):
        ``mgai/e{e}/lambda{lam}/spearman`` against the finest granularity and ``.../var_share`` of the summed
        advantage's variance. Only with several granularities."""
        if rewards.shape[3] < 2:
            return {}
        a = self.cfg.advantage
        spearman, share = mgai_diagnostics(rewards, self.weights, eps=a.eps, unbiased=a.unbiased)
        out = {}
        for k, e in enumerate(rollout.step_index.tolist()):
            for j, lam in enumerate(rollout.granularities):
                if j:
                    out[f"mgai/e{e}/lambda{lam}/spearman"] = float(spearman[k, j])
                out[f"mgai/e{e}/lambda{lam}/var_share"] = float(share[k, j])
        return out

    def observe(self, m: dict[str, float], rollout: Rollout) -> None:
        """``sampler.auto_granularity_threshold``, on the iteration's reduced metrics (every rank decides alike): a
        granularity whose mean Spearman correlation with the finest stays above the threshold for the window stops
        being rolled out; ``mgai/active_granularities`` logs how many remain."""
        s = self.cfg.sampler
        if s.auto_granularity_threshold is None:
            return
        dropped = []
        m["mgai/active_granularities"] = float(len(self.active))
        for lam in rollout.granularities[1:]:
            values = [v for k, v in m.items() if k.startswith("mgai/e") and k.endswith(f"/lambda{lam}/spearman")
                      and v == v]
            key = str(lam)
            high = bool(values) and sum(values) / len(values) > s.auto_granularity_threshold
            self.streak[key] = self.streak.get(key, 0) + 1 if high else 0
            if self.streak[key] >= s.auto_granularity_window:
                dropped.append(lam)
        if dropped:
            self.active = [g for g in self.active if g not in dropped]
            self._apply()
            self.log(f"auto granularity: dropped {dropped} (Spearman with the finest above "
                     f"{s.auto_granularity_threshold} for {s.auto_granularity_window} iterations); now {self.active}")
            m["mgai/active_granularities"] = float(len(self.active))
