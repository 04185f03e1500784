"""Stable Diffusion 3 / 3.5 adapter (diffusers' ``SD3Transformer2DModel``) behind the engine protocol.

Latents stay unpacked ``[B, 16, h, w]``. The transformer takes ``timestep = 1000 * sigma``
(as ``StableDiffusion3Pipeline`` feeds the scheduler's timesteps). Guidance is classifier-free
as in the pipeline: with ``guidance_scale > 1`` every row is evaluated with the prompt and
with the negative (empty by default) prompt in one doubled batch and combined as
``v_neg + g * (v_pos - v_neg)``; the conditioning then carries both embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers import StableDiffusion3Pipeline

from ..hub import dtype_kwarg
from ._vae import checked_folder, decode_in_chunks
from .base import PolicyAdapter

__all__ = ["SD3Policy", "load_sd3_policy"]


class SD3Policy(PolicyAdapter):
    def __init__(self, pipe: StableDiffusion3Pipeline, height: int, width: int, guidance_scale: float,
                 max_sequence_length: int, negative_prompt: str = "") -> None:
        super().__init__(pipe, height, width, guidance_scale, max_sequence_length)
        f = pipe.vae_scale_factor
        if height % (f * pipe.transformer.config.patch_size) or width % (f * pipe.transformer.config.patch_size):
            raise ValueError(f"height and width must be multiples of {f * pipe.transformer.config.patch_size}")
        self.latent_height, self.latent_width = height // f, width // f
        self.negative_prompt = negative_prompt
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.text_encoders = torch.nn.ModuleList([pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3])

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.bfloat16, **settings) -> SD3Policy:
        return cls(StableDiffusion3Pipeline.from_pretrained(checked_folder(path, "sd3"), **dtype_kwarg(dtype)), **settings)

    @property
    def transformer_rows_per_row(self) -> int:
        return 2 if self.classifier_free_on else 1  # the conditional and unconditional rows in one doubled batch

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        dtype = self.dtype
        t = sigma.float() * 1000.0  # fp32, as StableDiffusion3Pipeline feeds its scheduler's timesteps to time_proj
        if self.classifier_free_on:
            emb = torch.cat([cond["negative_prompt_embeds"], cond["prompt_embeds"]]).to(dtype)
            pooled = torch.cat([cond["negative_pooled_prompt_embeds"], cond["pooled_prompt_embeds"]]).to(dtype)
            return self.classifier_free(lambda xx, tt: self.transformer(
                hidden_states=xx.to(dtype), timestep=tt, encoder_hidden_states=emb, pooled_projections=pooled,
                return_dict=False)[0], x, t)[0]
        v = self.transformer(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                             pooled_projections=cond["pooled_prompt_embeds"].to(dtype), return_dict=False)[0]
        return v.float()

    def encode_batch(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        pe, npe, pp, npp = self._pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.text_device(), num_images_per_prompt=1,
            do_classifier_free_guidance=self.classifier_free_on, negative_prompt=[self.negative_prompt] * len(prompts),
            max_sequence_length=self.max_sequence_length)
        out = {"prompt_embeds": pe, "pooled_prompt_embeds": pp}
        if self.classifier_free_on:
            out.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=npp)
        return out

    @property
    def image_seq_len(self) -> int:
        p = self.transformer.config.patch_size
        return (self.latent_height // p) * (self.latent_width // p)

    def _pipeline_schedule_inputs(self, num_steps: int, config) -> tuple:
        """StableDiffusion3Pipeline (diffusers 0.42) passes no sigmas: the scheduler spaces its own sigma_max ..
        sigma_min (SD3.5: 1 .. 0.0089 at shift 3) and shifts them; ``mu`` only with ``use_dynamic_shifting``."""
        mu = self._pipeline_mu(config, max_shift=1.16) if config.get("use_dynamic_shifting", False) else None
        return None, mu

    def prepare_latents(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        c = self.transformer.config.in_channels
        return self.randn((n, c, self.latent_height, self.latent_width), generator, device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int = 8) -> torch.Tensor:
        cfg = self.vae.config
        return decode_in_chunks(self.vae, latents, batch, lambda z: z / cfg.scaling_factor + (cfg.shift_factor or 0.0))


def load_sd3_policy(path, dtype: torch.dtype = torch.bfloat16, **settings) -> SD3Policy:
    """SD3 from a local diffusers folder; unset settings take the family's defaults (models.registry)."""
    from .registry import load_family

    return load_family("sd3", path, dtype, **settings)
