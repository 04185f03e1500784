"""Reward models: one protocol (``score(images, prompts) -> [N]``), a registry, and the models."""

from .base import REWARD_BUILDERS, RewardModel, WeightedRewards, make_reward, register_reward
from . import clip_models, imagereward  # noqa: F401,E402  (register hps, clip, pickscore, imagereward)

__all__ = ["REWARD_BUILDERS", "RewardModel", "WeightedRewards", "make_reward", "register_reward"]
