"""The reward models a training config names: checked before anything loads, built, and scored in chunks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig, RewardSpec
from ..hub import reward_options
from ..models.registry import FAMILIES, family
from .base import FRAME_REDUCTIONS, FrameAggregated, RewardModel
from .registry import BUILTIN_REWARDS, make_reward, resolve_reward, takes_prompt_file
from .remote import RemoteRewardError

__all__ = ["build_rewards", "check_reward_specs", "check_world_rewards", "score_in_chunks"]


def check_reward_specs(specs: list[RewardSpec], key: str = "rewards") -> None:
    """Each reward's frame reduction, and its name: a built-in, or a plug-in / ``module:callable`` that imports (no
    model loads). ConfigError naming the entry (``key``: the list's config key)."""
    for i, r in enumerate(specs):
        if r.frames not in FRAME_REDUCTIONS:
            raise ConfigError(f"{key}[{i}].frames must be one of {FRAME_REDUCTIONS}, got {r.frames!r}")
        if r.name not in BUILTIN_REWARDS:
            try:
                resolve_reward(r.name)
            except ValueError as err:
                raise ConfigError(f"{key}[{i}].name: {err}") from None


def check_world_rewards(model: ModelConfig, rewards: list[RewardSpec], key: str = "rewards") -> None:
    """Before anything loads: a lab world's reward scores that world's images only (the digits' one channel, the
    scenes' 16x16 RGB). ConfigError naming the reward and what to set instead."""
    mine = FAMILIES[model.kind]
    for i, r in enumerate(rewards):
        owner = next((f for f in FAMILIES.values() if r.name in f.world_rewards), None)
        if owner is not None and owner.name != mine.name:
            own = (", ".join(mine.world_rewards) if mine.world_rewards else
                   "a reward for its images (hps, clip, pickscore, imagereward, ..., or your own)")
            raise ConfigError(f"{key}[{i}].name: {r.name} scores {owner.title}'s images, not {mine.title}'s "
                              f"(model.kind={mine.name}); set rewards to {own}")


def build_rewards(specs: list[RewardSpec], model_cfg: ModelConfig, model_path: Path,
                  prompt_file: str | None = None) -> list[tuple[str, RewardModel, float]]:
    """``[(metric name, model, weight)]`` (the label, else the name); a family's world rewards (the lab's)
    default to the policy's folder."""
    world_rewards = family(model_cfg.kind).world_rewards
    out = []
    for spec in specs:
        options = reward_options(spec.name, spec.options, f"rewards ({spec.name})")
        if spec.name in world_rewards:
            options.setdefault("world", str(model_path))
        if prompt_file is not None and takes_prompt_file(spec.name):  # e.g. first_frame: the conditioning images
            options.setdefault("prompt_file", prompt_file)
        out.append((spec.metric_name, FrameAggregated(make_reward(spec.name, **options), spec.frames), spec.weight))
    return out


def score_in_chunks(rewards: list[tuple[str, RewardModel, float]], decode: Callable[[torch.Tensor], torch.Tensor],
                    latents: torch.Tensor, prompts: list[str], batch: int, device: torch.device) -> torch.Tensor:
    """``[R, N]`` float scores of ``N`` latents (``prompts[n]`` each), decoded and scored ``batch`` at a time so
    that at most ``batch`` decoded images are held. A served reward's failure propagates as a RemoteRewardError
    naming the reward (the caller names the iteration)."""
    parts: list[list[torch.Tensor]] = [[] for _ in rewards]
    for lo in range(0, latents.shape[0], batch):
        images = decode(latents[lo:lo + batch])
        for r, (name, model, _) in enumerate(rewards):
            try:
                scores = model.score(images, prompts[lo:lo + batch])
            except RemoteRewardError as err:
                raise RemoteRewardError(f"reward {name}: {err}") from None
            parts[r].append(scores.float().to(device))
    return torch.stack([torch.cat(p) for p in parts])
