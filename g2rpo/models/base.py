"""The adapter protocol every model family implements, and the set-up they share.

An adapter is a velocity model behind the engine's protocol ``model(x, sigma, cond) -> velocity``
(fp32 out) plus what the trainer and eval need around it:

* ``encode_prompts(prompts) -> cond``: text embeddings, computed once per prompt and cached (the
  text encoders are frozen), one row per prompt;
* ``prepare_latents(n, generator, device)``: initial noise as the family's pipeline draws it (in
  ``noise_dtype``: fp32, or bf16 as the public Flux GRPO code draws it);
* ``decode(latents) -> images [n, C, H, W]`` (videos ``[n, C, F, H, W]``) in [0, 1];
* ``save_pretrained(folder)``: the pipeline's own layout, with the (trained) transformer;
* ``transformer`` (the trained module) and :meth:`set_transformer` (the reference policy, a checkpoint);
* ``compute_dtype``: the dtype of every input (latents, text, timestep). None means the parameters'
  dtype, which changes under FSDP2 (bf16 gathered for a rollout, fp32 shards in training): the trainer
  fixes it to ``model.dtype`` so that rollout and training feed the model the same values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..hub import dtype_kwarg
from ._cache import PromptEmbeddingCache

__all__ = ["PolicyAdapter"]


class PolicyAdapter(torch.nn.Module):
    """Shared set-up: the pipeline, the image size, guidance, the prompt cache, the input dtype, CFG."""

    def __init__(self, pipe: Any, height: int, width: int, guidance_scale: float | None,
                 max_sequence_length: int) -> None:
        super().__init__()
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self._pipe = pipe  # tokenizers, encode_prompt, the pipeline's static latent helpers, save_pretrained
        self.height, self.width = int(height), int(width)
        self.guidance_scale = guidance_scale
        self.max_sequence_length = int(max_sequence_length)
        self._cache = PromptEmbeddingCache()
        self.compute_dtype: torch.dtype | None = None
        #: the dtype initial noise is drawn in (then used as fp32): float32, or bfloat16 as the public Flux GRPO
        #: code draws it (``torch.randn(..., dtype=torch.bfloat16)``), which gives other values from one generator
        self.noise_dtype: torch.dtype = torch.float32
        #: classifier-free guidance without gradient through the negative branch (Flow-GRPO's SD3 training:
        #: ``noise_pred_uncond.detach()``)
        self.detach_uncond = False
        #: families whose transformer takes timesteps in [0, 1000]: feed the integer (sampler.quantize_timesteps)
        self.integer_timesteps = False

    # ---- the trained module and its inputs' dtype -------------------------------------------
    def set_transformer(self, module: torch.nn.Module) -> None:
        """Replace the transformer (a checkpoint's, or the frozen reference for the KL term)."""
        self.transformer = module

    @property
    def dtype(self) -> torch.dtype:
        """The dtype every input is cast to."""
        return self.compute_dtype or next(self.transformer.parameters()).dtype

    # ---- prompts -------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{name: [len(prompts), ...]}``; each prompt is encoded once, alone (:meth:`encode_batch`)."""
        return self._cache(list(prompts), self.encode_batch)

    def encode_batch(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The family's text encoding of ``prompts`` (called with one prompt at a time by the cache)."""
        raise NotImplementedError

    def text_device(self, encoder: torch.nn.Module | None = None) -> torch.device:
        module = encoder if encoder is not None else self.transformer
        return next(module.parameters()).device

    # ---- guidance ------------------------------------------------------------------------------
    @property
    def classifier_free_on(self) -> bool:
        """Classifier-free guidance is on (a scale > 1)."""
        return self.guidance_scale is not None and float(self.guidance_scale) > 1.0

    @property
    def transformer_rows_per_row(self) -> int:
        """Transformer rows one policy row runs (the unit of ``cost``): 1, or 2 for a family that guides by
        classifier-free guidance in one doubled batch (:meth:`classifier_free`) while it is on."""
        return 1

    def classifier_free(self, run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                        t: torch.Tensor, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One doubled batch ``run([x; x], [t; t])`` whose first half holds the negative rows and the
        second the prompt's; returns ``(neg + g (pos - neg), neg, pos)`` in fp32 (as the pipelines combine);
        ``g`` is ``scale`` or the guidance scale."""
        v = run(torch.cat([x, x]), torch.cat([t, t])).float()
        neg, pos = v.chunk(2)
        if self.detach_uncond:
            neg = neg.detach()
        g = float(self.guidance_scale if scale is None else scale)
        return neg + g * (pos - neg), neg, pos

    # ---- experts (Wan 2.2's two transformers; one for every other family) -------------------------
    def expert_names(self) -> tuple[str, ...]:
        """The transformers of the pipeline, by their component names."""
        return ("transformer",)

    def expert_of_sigma(self, sigma: float) -> str:
        """The expert that predicts the velocity at noise level ``sigma``."""
        return "transformer"

    def set_trained_experts(self, names: Sequence[str]) -> None:
        """Train only these experts (the others stay frozen); a single-transformer family trains its one."""
        if tuple(names) != ("transformer",):
            raise ValueError(f"{type(self).__name__} has the one transformer; cannot train {list(names)}")

    def load_transformers(self, folder, dtype: torch.dtype) -> torch.nn.Module:
        """The trained module as saved in an export ``folder`` (the pipeline layout), for :meth:`set_transformer`."""
        from pathlib import Path

        return type(self.transformer).from_pretrained(Path(folder) / "transformer", **dtype_kwarg(dtype))

    def lora_modules(self) -> dict[str, torch.nn.Module]:
        """The trained modules holding LoRA adapters, by the pipeline component each is saved for."""
        return {"transformer": self.transformer}

    def lora_folder_suffix(self, component: str) -> str:
        """The suffix of the folder beside an export that holds ``component``'s LoRA adapter (``<export>_lora``)."""
        return "_lora"

    def shard_blocks(self) -> list[torch.nn.Module]:
        """The blocks FSDP2 shards one by one before the root: an MMDiT's double-stream ``transformer_blocks``
        and, where it has them, its ``single_transformer_blocks`` (Flux, FLUX.2)."""
        t = self.transformer
        return [*t.transformer_blocks, *getattr(t, "single_transformer_blocks", [])]

    # ---- the schedule's shift ----------------------------------------------------------------------
    @property
    def image_seq_len(self) -> int:
        """Image tokens per sample (what a pipeline's dynamic shift reads)."""
        raise NotImplementedError(f"{type(self).__name__} has no image sequence length")

    def dynamic_shift(self) -> float:
        """``exp(mu)`` with ``mu = calculate_shift(image_seq_len, ...)`` from the pipeline scheduler's config, as
        FluxPipeline and QwenImagePipeline compute it: their exponential time shift of the sigmas equals the static
        shift ``s * t / (1 + (s - 1) t)`` with ``s = exp(mu)``."""
        import math

        config = getattr(getattr(self._pipe, "scheduler", None), "config", None)
        if config is None or not config.get("use_dynamic_shifting", False):
            raise ValueError(f"{type(self).__name__}: the pipeline's scheduler does not shift dynamically "
                             "(sampler.dynamic_shift needs use_dynamic_shifting in scheduler/scheduler_config.json)")
        return math.exp(self._pipeline_mu(config))

    def _pipeline_mu(self, config, max_shift: float = 1.15) -> float:
        """``mu = calculate_shift(image_seq_len, ...)`` from a scheduler config, with the defaults the pipelines use
        for keys it lacks (FluxPipeline, QwenImagePipeline: ``max_shift`` 1.15; StableDiffusion3Pipeline: 1.16)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        return calculate_shift(self.image_seq_len, config.get("base_image_seq_len", 256),
                               config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                               config.get("max_shift", max_shift))

    def pipeline_sigmas(self, num_steps: int) -> torch.Tensor:
        """The ``num_steps + 1`` sigmas (float64) the family's diffusers pipeline samples with when called with its
        defaults (``pipe(prompt, num_inference_steps=num_steps)``): the pipeline's own inputs to its scheduler
        (:meth:`_pipeline_schedule_inputs`) through a fresh copy of the scheduler it carries, so that every setting
        of its ``scheduler_config.json`` holds (shift, dynamic shift and its sequence lengths, ``shift_terminal``,
        sigma_min, Karras / exponential / beta sigmas). Only for flow-match Euler schedulers (ValueError
        otherwise: a UniPC or DPM scheduler's steps are not the Euler steps g2rpo takes)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = getattr(self._pipe, "scheduler", None)
        if type(sched) is not FlowMatchEulerDiscreteScheduler:
            raise ValueError(f"{type(self).__name__}: the pipeline's scheduler is {type(sched).__name__}, not "
                             "FlowMatchEulerDiscreteScheduler, so its default schedule is not an Euler one: use the "
                             "static shift schedule (sampler.schedule: shift)")
        sigmas, mu = self._pipeline_schedule_inputs(num_steps, sched.config)
        fresh = FlowMatchEulerDiscreteScheduler.from_config(sched.config)
        fresh.set_timesteps(num_inference_steps=None if sigmas is not None else num_steps, sigmas=sigmas, mu=mu)
        from ..schedule import check_sigmas

        return check_sigmas(fresh.sigmas, num_steps)

    def _pipeline_schedule_inputs(self, num_steps: int, config) -> tuple[Any, float | None]:
        """``(sigmas, mu)`` the pipeline's ``__call__`` passes its scheduler by default. FluxPipeline and
        QwenImagePipeline (diffusers 0.42): ``linspace(1, 1/T, T)`` and ``mu = calculate_shift(image_seq_len, ...)``
        from the scheduler config (used only when it shifts dynamically)."""
        import numpy as np

        return np.linspace(1.0, 1 / num_steps, num_steps), self._pipeline_mu(config)

    # ---- latents, images, saving ---------------------------------------------------------------
    def prepare_latents(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        raise NotImplementedError

    def randn(self, shape, generator: torch.Generator | None, device) -> torch.Tensor:
        """Standard normal noise drawn in :attr:`noise_dtype`, returned as fp32."""
        return torch.randn(shape, generator=generator, device=device, dtype=self.noise_dtype).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def save_pretrained(self, folder) -> None:
        """The pipeline's own ``save_pretrained`` layout, with the current transformer."""
        self._pipe.transformer = self.transformer
        self._pipe.save_pretrained(folder)
