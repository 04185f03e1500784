"""Reward models: one protocol (``score(images, prompts) -> [N]``), a registry, and the models."""

from .base import FrameAggregated, REWARD_BUILDERS, RewardModel, WeightedRewards, make_reward, register_reward
from . import clip_models, imagereward, unified_reward  # noqa: F401,E402  (register the reward models)

__all__ = ["FrameAggregated", "REWARD_BUILDERS", "RewardModel", "WeightedRewards", "make_reward", "register_reward"]
