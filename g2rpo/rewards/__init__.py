"""Reward models: one protocol (``score(images, prompts) -> [N]``), a registry, and the models."""

from .base import FRAME_REDUCTIONS, FrameAggregated, REWARD_BUILDERS, RewardModel, WeightedRewards, make_reward, register_reward
from . import clip_models, imagereward, unified_reward  # noqa: F401,E402  (register the reward models)

__all__ = ["FRAME_REDUCTIONS", "FrameAggregated", "REWARD_BUILDERS", "RewardModel", "WeightedRewards", "make_reward", "register_reward"]
