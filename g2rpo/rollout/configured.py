"""The strategy a config asks for, built and checked in one place (:func:`strategy_from_config`)."""

from __future__ import annotations

import torch

from ..config import ConfigError, SamplerConfig
from .strategies import STRATEGY_CLASSES, Strategy, make_strategy, strategy_options

__all__ = ["check_strategy_schedule", "sampler_strategy_options", "strategy_from_config"]

#: SamplerConfig keys of the trajectory strategies (None: the strategy's default).
TRAJECTORY_OPTIONS = ("train_fraction", "shared_noise", "window_size", "window_stride", "shift_interval",
                      "window_max_start", "train_selection", "train_last_step", "window_end", "window_roll_back",
                      "score_x0")


def sampler_strategy_options(s: SamplerConfig) -> dict:
    """The keyword arguments of :func:`~.strategies.make_strategy` a sampler config gives (the keys its strategy
    takes; unset ones left to the strategy's defaults). ConfigError names an unknown strategy."""
    try:
        return strategy_options(s.strategy, num_steps=s.num_steps, group_size=s.group_size, eta=s.eta,
                                sde_indices=s.sde_indices, granularities=s.granularities, sde_subset=s.sde_subset,
                                chain_sources=s.chain_sources, **{k: getattr(s, k) for k in TRAJECTORY_OPTIONS})
    except ValueError as err:
        raise ConfigError(f"sampler.strategy: {err}") from None


def strategy_from_config(s: SamplerConfig, subset_seed: int | None = None) -> Strategy:
    """The strategy of ``sampler``, its own checks first (:meth:`~.strategies.Strategy.config_problems`), each
    failure a ConfigError naming the key; ``subset_seed`` seeds G2RPO's ``sde_subset`` draw (the sampler seed)."""
    options = sampler_strategy_options(s)
    problems = STRATEGY_CLASSES[s.strategy].config_problems(s.strategy, s, options)
    if problems:
        raise ConfigError(problems[0])
    if subset_seed is not None and "sde_subset" in options:
        options["subset_seed"] = subset_seed
    try:
        return make_strategy(s.strategy, **options)
    except ValueError as err:
        raise ConfigError(f"sampler: {err}") from None


def check_strategy_schedule(strategy: Strategy, sigmas: torch.Tensor) -> None:
    """:meth:`~.strategies.Strategy.check_schedule` as a ConfigError."""
    try:
        strategy.check_schedule(sigmas)
    except ValueError as err:
        raise ConfigError(str(err)) from None
