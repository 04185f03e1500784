"""Every check of a training config that needs no model: the config's own (:meth:`TrainConfig.validate`), its
strategy's (:func:`g2rpo.rollout.configured.strategy_from_config`, eta against the static schedule) and its
rewards' names (:func:`g2rpo.rewards.configured.check_reward_specs`)."""

from __future__ import annotations

from ..config import TrainConfig
from ..rewards.configured import check_reward_specs
from ..rollout.configured import check_strategy_schedule, strategy_from_config
from ..rollout.strategies import Strategy
from ..schedule import sigma_schedule

__all__ = ["check_config"]


def check_config(cfg: TrainConfig, subset_seed: int | None = None) -> Strategy:
    """ConfigError naming the key of the first problem; else the strategy the run will use (``subset_seed``: as
    :func:`~g2rpo.rollout.configured.strategy_from_config`). The pipeline and the dynamic-shift schedules are checked
    at set-up, on the loaded model's sigmas."""
    cfg.validate()
    s = cfg.sampler
    strategy = strategy_from_config(s, subset_seed)
    if s.resolved_schedule(cfg.model.kind) == "shift" and not s.dynamic_shift:
        check_strategy_schedule(strategy, sigma_schedule(strategy.num_steps, s.static_shift, s.schedule_precision))
    check_reward_specs(cfg.rewards)
    check_reward_specs(cfg.eval.rewards, "eval.rewards")
    return strategy
