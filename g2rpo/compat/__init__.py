"""The public GRPO codebases' step functions with their signatures and returns, on g2rpo's math
(:mod:`g2rpo.sde`: one equation, written once), so a script swaps them in by changing one import:

- :func:`g2rpo.compat.flow_grpo.sde_step_with_logprob` (Flow-GRPO, ``flow_grpo/diffusers_patch``);
- :func:`g2rpo.compat.dance_grpo.flux_step` (DanceGRPO, ``fastvideo/train_grpo_flux.py``);
- :func:`g2rpo.compat.g2rpo_official.flow_grpo_step` (the official G2RPO scripts).

The math runs in fp32 whatever the input dtype (the public callers pass fp32 latents), noise is
drawn exactly as each original draws it (same generator, same dtype), and the log-prob is the
Gaussian log-density averaged over non-batch dims.
"""

from . import dance_grpo, flow_grpo, g2rpo_official

__all__ = ["dance_grpo", "flow_grpo", "g2rpo_official"]
