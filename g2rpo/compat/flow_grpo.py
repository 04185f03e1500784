"""Flow-GRPO's ``sde_step_with_logprob`` (``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``).

Swap it in by changing one import::

    # from flow_grpo.diffusers_patch.sd3_sde_with_logprob import sde_step_with_logprob
    from g2rpo.compat.flow_grpo import sde_step_with_logprob
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..sde import _rows, diffusion, sde_step_with_logprob as _sde_step

__all__ = ["sde_step_with_logprob"]


def sde_step_with_logprob(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, noise_level: float = 0.7,
                          prev_sample: torch.Tensor | None = None, generator: torch.Generator | None = None):
    """One Flow-GRPO SDE step (Eq. 2-3) from the scheduler's ``timestep`` (per row) to the next one.

    ``self`` is a diffusers ``FlowMatchEulerDiscreteScheduler`` whose ``timesteps``/``sigmas`` are set;
    ``timestep`` holds one scheduler timestep per row. Returns ``(prev_sample, log_prob,
    prev_sample_mean, std_dev_t)`` as Flow-GRPO: fp32 ``[B, ...]``, ``[B]``, ``[B, ...]`` and
    ``sigma_t = noise_level * sqrt(sigma / (1 - sigma))`` (not multiplied by sqrt(dt)) viewed
    ``[B, 1, ..., 1]``; with ``prev_sample`` given it is scored and no noise is drawn.
    """
    if not isinstance(timestep, torch.Tensor) or timestep.ndim != 1:
        raise ValueError(f"sde_step_with_logprob: timestep must be a 1-D tensor of one scheduler timestep per row, got "
                         f"{timestep!r}" if not isinstance(timestep, torch.Tensor) else
                         f"sde_step_with_logprob: timestep must be 1-D (one per row), got shape {tuple(timestep.shape)}")
    if sample.ndim < 2 or timestep.numel() != sample.shape[0]:
        raise ValueError(f"sde_step_with_logprob: {timestep.numel()} timesteps for a sample of shape "
                         f"{tuple(sample.shape)}: one per row")
    if model_output.shape != sample.shape:
        raise ValueError(f"sde_step_with_logprob: model_output has shape {tuple(model_output.shape)}, sample "
                         f"{tuple(sample.shape)}: they must be equal")
    if prev_sample is not None and prev_sample.shape != sample.shape:
        raise ValueError(f"sde_step_with_logprob: prev_sample has shape {tuple(prev_sample.shape)}, sample "
                         f"{tuple(sample.shape)}: they must be equal")
    known = self.timesteps.to(timestep.device)
    missing = [float(t) for t in timestep if not bool((known == t).any())]
    if missing:
        raise ValueError(f"sde_step_with_logprob: timestep {missing[0]:g} is not in the scheduler's timesteps "
                         "(call set_timesteps first, and pass its own values)")
    model_output, sample = model_output.float(), sample.float()
    if prev_sample is not None:
        prev_sample = prev_sample.float()
    step_index = torch.tensor([self.index_for_timestep(t) for t in timestep], dtype=torch.long)
    sigmas = self.sigmas.to(torch.float32).cpu()
    noise = None
    if prev_sample is None:  # drawn as Flow-GRPO draws it: same generator, shape and dtype
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype)
    prev, log_prob, mean, _ = _sde_step(model_output, sample, sigmas, step_index, float(noise_level),
                                        prev_sample=prev_sample, noise=noise, kind="flow_grpo")
    sigma_t, _, _ = diffusion(sigmas, step_index, float(noise_level), "flow_grpo")
    std_dev_t = _rows(sigma_t.to(device=sample.device, dtype=torch.float32), sample.ndim)
    return prev, log_prob, mean, std_dev_t
