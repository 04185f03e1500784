"""Rollouts: plans (which states, which rows at which tick), the batched engine, the strategies
and :class:`RolloutSampler` (alias ``G2RPOSampler``), the drop-in sampler for other GRPO codebases."""

from __future__ import annotations

from .engine import Rollout, RolloutEngine, VelocityModel, cond_prompt_count, gather_cond
from .plan import Plan, PlanBuilder
from .sampler import G2RPOSampler, RolloutSampler
from .units import TrainingUnit
from .strategies import STRATEGIES, G2RPOStrategy, Strategy, TrajectoryStrategy, make_strategy

__all__ = [
    "G2RPOSampler", "Plan", "PlanBuilder", "Rollout", "RolloutEngine", "RolloutSampler", "STRATEGIES", "G2RPOStrategy",
    "Strategy", "TrainingUnit", "TrajectoryStrategy", "VelocityModel", "cond_prompt_count", "gather_cond",
    "make_strategy",
]
