"""Reward models: one protocol (``score(images, prompts) -> [N]``), a registry (names, ``module:callable``
paths, entry points of group ``g2rpo.rewards``), and the models (imported when used)."""

from .base import FRAME_REDUCTIONS, FrameAggregated, RewardModel, WeightedRewards
from .registry import (BUILTIN_REWARDS, ENTRY_POINT_GROUP, REWARD_BUILDERS, CallableReward, known_rewards, make_reward,
                       register_reward, resolve_reward)

__all__ = ["BUILTIN_REWARDS", "ENTRY_POINT_GROUP", "FRAME_REDUCTIONS", "CallableReward", "FrameAggregated",
           "REWARD_BUILDERS", "RewardModel", "WeightedRewards", "known_rewards", "make_reward", "register_reward",
           "resolve_reward"]
