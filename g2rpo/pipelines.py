"""Rollouts straight from diffusers pipeline objects: the drop-in path for other GRPO codebases.

    from g2rpo.pipelines import rollout, unit_log_probs
    out = rollout(pipe, ["a cat", "a dog"], strategy="g2rpo", group_size=12)   # FluxPipeline or SD3 pipeline
    rewards = my_reward(out.images, out.prompts_per_image)                     # [P * K' * J * G]
    adv = integrate_advantages(rewards.view(1, *out.rollout.reward_shape))     # [P, K', G]
    for unit in out.rollout.training_units():                                  # any strategy
        logp = unit_log_probs(out.policy, out.rollout, unit, out.cond)         # ONE forward at unit.x
        ratio = (logp - unit.old_log_probs).exp()
        a = adv[unit.prompt, unit.adv_slot, unit.branches]

``rollout`` encodes the prompts with the pipeline's own text encoders, draws the initial latents as
the pipeline does (packed for Flux), runs the batched engine with the chosen strategy and decodes
the finals with the pipeline's VAE. The policy adapter (:class:`~g2rpo.models.FluxPolicy`,
:class:`~g2rpo.models.SD3Policy`, :class:`~g2rpo.models.QwenImagePolicy`) wraps the pipeline's own modules: training ``pipe.transformer``
trains the policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .rollout import G2RPOSampler, Rollout, TrainingUnit
from .rollout.scoring import score_unit

__all__ = ["PipelineRollout", "policy_for", "rollout", "unit_log_probs"]


@dataclass
class PipelineRollout:
    images: torch.Tensor | None  # [P * K' * J * G, C, H, W] in [0, 1], in the order of rollout.flat_finals()
    rollout: Rollout
    cond: Any  # the prompts' embeddings, one entry per prompt (what unit_log_probs needs)
    policy: torch.nn.Module  # the velocity adapter around pipe.transformer
    sampler: G2RPOSampler
    prompts: list[str] = field(default_factory=list)

    @property
    def prompts_per_image(self) -> list[str]:
        """The prompt of every image, aligned with ``images``."""
        per = len(self.images) // len(self.prompts) if self.images is not None else 0
        return [p for p in self.prompts for _ in range(per)]


def policy_for(pipe, height: int | None = None, width: int | None = None, guidance_scale: float | None = None,
               max_sequence_length: int | None = None, **settings) -> torch.nn.Module:
    """The engine-protocol adapter of a diffusers pipeline of any family in ``g2rpo.models.registry``
    (FluxPipeline, Flux2Pipeline, StableDiffusion3Pipeline, QwenImagePipeline, WanPipeline). Unset settings
    take the pipeline's own sample size and the family's defaults."""
    from .models.registry import family_of_pipeline, settings as family_settings

    fam = family_of_pipeline(pipe)
    size = getattr(pipe, "default_sample_size", None)
    if size is not None and height is None and width is None:
        height = width = size * pipe.vae_scale_factor
    kwargs = family_settings(fam, height=height, width=width, guidance_scale=guidance_scale,
                             max_sequence_length=max_sequence_length, **settings)
    return fam.adapter_class()(pipe, **kwargs)


def rollout(pipe, prompts: Sequence[str], strategy: str = "g2rpo", *, num_steps: int = 16, group_size: int = 12,
            eta: float | None = None, sde_indices: Sequence[int] | None = None,
            granularities: Sequence[int] | None = None, max_batch: int = 64, seed: int = 0, decode: bool = True,
            height: int | None = None, width: int | None = None, guidance_scale: float | None = None,
            max_sequence_length: int | None = None, shift: float | None = None, images: Sequence | None = None,
            **options) -> PipelineRollout:
    """One rollout of ``prompts`` on a diffusers pipeline with any strategy (``g2rpo``, ``g2rpo_no_mgai``,
    ``dance_grpo``, ``flow_grpo``, ``mix_grpo``). Per-prompt generators seeded from ``seed`` make a
    prompt's samples independent of the other prompts in the call. An image-to-video pipeline
    (WanImageToVideoPipeline) takes ``images``: one per prompt, an image path or a ``(path, last image path)``;
    a family's own settings (:class:`~g2rpo.models.registry.FamilyOption`, e.g. a video pipeline's frames) go to
    its adapter, every other keyword to the strategy (``window_size``, ``train_fraction``, ...). ``shift`` None samples on the pipeline's own default
    schedule (its scheduler config, as ``pipe(prompt, num_inference_steps=num_steps)``) for Flux, SD3, Qwen-Image
    and FLUX.2 (ValueError if their scheduler was swapped for a non-Euler one), else (Wan, whose pipelines default
    to UniPC) on the static shift 3 of the public GRPO code; a ``shift`` gives the static
    schedule ``shift * s / (1 + (shift - 1) s)`` on ``s = linspace(1, 0, num_steps + 1)`` (the G2RPO / DanceGRPO /
    MixGRPO scripts')."""
    if isinstance(prompts, str):
        raise ValueError(f"prompts must be a list of strings, got one string {prompts!r}: pass [{prompts!r}]")
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63 - 2 * len(prompts):
        raise ValueError(f"seed must be an int in 0..2**63 - 1 - 2 * len(prompts), got {seed!r}")
    for name, value in (("height", height), ("width", width)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an int >= 1 (or None: the pipeline's own), got {value!r}")
    from .models.registry import FAMILIES, all_family_options, family_of_pipeline

    fam = family_of_pipeline(pipe)
    own_settings = {k: v for k, v in options.items() if k in all_family_options() and all_family_options()[k].setting}
    wrong = [k for k, v in own_settings.items() if v is not None and k not in fam.option_names]
    if wrong:
        raise ValueError(f"{wrong[0]}: {type(pipe).__name__} does not take it (only "
                         f"{', '.join(n for n, f in FAMILIES.items() if wrong[0] in f.option_names)} pipelines do)")
    strategy_options = {k: v for k, v in options.items() if k not in own_settings}
    policy = policy_for(pipe, height, width, guidance_scale, max_sequence_length,
                        **{k: v for k, v in own_settings.items() if v is not None})
    _set_images(pipe, policy, prompts, images)
    device = next(policy.transformer.parameters()).device
    own = shift is None and fam.defaults.schedule == "pipeline"
    sampler = G2RPOSampler(policy, num_steps=num_steps, shift=3.0 if shift is None else shift,
                           sigmas=policy.pipeline_sigmas(num_steps) if own else None, eta=eta, sde_indices=sde_indices,
                           granularities=granularities, group_size=group_size, max_batch=max_batch, strategy=strategy,
                           **strategy_options)
    gens = [torch.Generator(device=device).manual_seed(seed + 2 * p) for p in range(len(prompts))]
    noise = sampler.per_prompt_noise(policy.prepare_latents, gens, device)
    sde_gens = [torch.Generator(device=device).manual_seed(seed + 2 * p + 1) for p in range(len(prompts))]
    with torch.no_grad():
        cond = policy.encode_prompts(prompts)
        ro = sampler.rollout(noise, cond, generator=sde_gens)
        images = policy.decode(ro.flat_finals()) if decode else None
    return PipelineRollout(images, ro, cond, policy, sampler, prompts)


def _set_images(pipe, policy, prompts: list[str], images: Sequence | None) -> None:
    """Give an image-to-video policy its prompts' images (checked as a prompt file's); refuse them elsewhere."""
    from pathlib import Path

    from .models.registry import family_of_pipeline
    from .prompts import image_prompts

    needs = family_of_pipeline(pipe).prompt_images
    if not needs:
        if images is not None:
            raise ValueError(f"images: {type(pipe).__name__} is not an image-to-video pipeline")
        return
    if images is None or isinstance(images, (str, Path)) or len(images) != len(prompts):
        raise ValueError(f"{type(pipe).__name__} needs images: one per prompt ({len(prompts)}), an image path "
                         "or a (path, last image path) pair")
    pairs = [(item, None) if isinstance(item, (str, Path)) else tuple(item) for item in images]
    entries = image_prompts((f"images[{i}]", p, Path(first), None if last is None else Path(last))
                            for i, (p, (first, last)) in enumerate(zip(prompts, pairs)))
    policy.set_prompt_images(entries)


def unit_log_probs(policy, ro: Rollout, unit: TrainingUnit, cond: Any, *, quantize_timesteps: bool = False,
                   backend: str = "auto") -> torch.Tensor:
    """New log-probs ``[n]`` of a unit's transitions: ONE forward of ``policy`` at ``unit.x``
    (differentiable; compare with ``unit.old_log_probs`` for the ratio)."""
    return score_unit(policy, ro, unit, cond, quantize_timesteps=quantize_timesteps, backend=backend).log_prob
