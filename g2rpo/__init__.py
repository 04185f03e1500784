"""g2rpo: Granular-GRPO for flow-matching image generators."""

from .schedule import granularity_grid, model_timesteps, sigma_schedule
from .sde import (
    SDE_KINDS,
    gaussian_log_prob,
    ode_step,
    sde_coefficients,
    sde_step_with_logprob,
    sde_transition,
)

__version__ = "0.1.0"

__all__ = [
    "SDE_KINDS",
    "gaussian_log_prob",
    "granularity_grid",
    "model_timesteps",
    "ode_step",
    "sde_coefficients",
    "sde_step_with_logprob",
    "sde_transition",
    "sigma_schedule",
]

#: Imported when first named, so that ``import g2rpo.config`` loads no strategy or engine.
_LAZY = {"group_advantages": ".advantage", "integrate_advantages": ".advantage", "G2RPOSampler": ".rollout",
         "Rollout": ".rollout", "RolloutEngine": ".rollout", "RolloutSampler": ".rollout", "make_strategy": ".rollout"}
__all__ += list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
