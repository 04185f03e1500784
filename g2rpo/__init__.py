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

from .advantage import group_advantages, integrate_advantages  # noqa: E402
from .rollout import G2RPOSampler, Rollout, RolloutEngine, RolloutSampler, make_strategy  # noqa: E402

__all__ += ["G2RPOSampler", "Rollout", "RolloutEngine", "RolloutSampler", "group_advantages", "integrate_advantages",
            "make_strategy"]
