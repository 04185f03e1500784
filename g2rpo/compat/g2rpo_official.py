"""The official G2RPO scripts' ``flow_grpo_step`` (``fastvideo/train_g2rpo_hps.py``).

Swap it in by changing one import (or the function's definition)::

    from g2rpo.compat.g2rpo_official import flow_grpo_step
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..sde import sde_step_with_logprob
from ._public_math import PRECISIONS, check_step_inputs, official_flow_grpo_step

__all__ = ["flow_grpo_step"]


def flow_grpo_step(model_output: torch.Tensor, latents: torch.Tensor, eta: float, sigmas: torch.Tensor, index: int,
                   prev_sample: torch.Tensor | None, generator: torch.Generator | None = None, *,
                   precision: str = "public"):
    """The Flow-GRPO SDE step (Eq. 2-3) as the official G2RPO code calls it: ``eta = 0`` for its ODE
    steps (``log_prob`` is then NaN or inf, unused there). Noise is drawn as there: ``randn_tensor`` with the
    model output's dtype (bf16 under autocast). Returns ``(prev_sample, pred_original_sample, log_prob)``.

    ``precision="public"`` (default): the official arithmetic in the inputs' dtypes, bit-equal to it for the
    same inputs and RNG state, the same returned dtypes. ``precision="fp32"``: g2rpo's fp32 math.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    index = check_step_inputs(model_output, latents, sigmas, index, prev_sample, "flow_grpo_step")
    if precision == "public":
        return official_flow_grpo_step(model_output, latents, eta, sigmas, index, prev_sample, generator)
    x = latents.float()
    pred_original_sample = x - float(sigmas[index]) * model_output.float()
    noise = None
    if prev_sample is None:
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype).float()
    prev, log_prob, _, _ = sde_step_with_logprob(model_output, x, sigmas, index, float(eta), prev_sample=prev_sample,
                                                 noise=noise, kind="flow_grpo")
    return prev, pred_original_sample, log_prob
