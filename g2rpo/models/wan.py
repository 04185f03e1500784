"""Wan 2.1 / 2.2 text-to-video adapter (diffusers' ``WanTransformer3DModel``) behind the engine protocol.

Latents are the pipeline's ``[B, C, F', h, w]`` video latents (``F' = (frames - 1) / t + 1`` for the VAE's
temporal factor t, ``h, w`` = height, width / spatial factor). The transformer takes ``timestep = 1000 *
sigma``: continuous by default; with ``integer_timesteps`` (the trainer sets it from
``sampler.quantize_timesteps``) the integer ``int(sigma * 1000)``, as DanceGRPO's Wan trainer feeds it (the
engine then passes ``int(sigma * 1000) / 1000``, rounded back to that integer here). Guidance is classifier-free as in
the pipeline (``guidance_scale > 1``: the prompt and the negative prompt, combined as
``v_neg + g (v_pos - v_neg)``), here in one doubled batch. ``decode`` returns videos
``[B, 3, F, H, W]`` in [0, 1] (the VAE's ``latents_mean`` / ``latents_std`` undone first). Wan 2.2's
second (low-noise) transformer is not supported: a pipeline with ``transformer_2`` is refused.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ._vae import checked_folder, decode_in_chunks, latent_stats
from .base import PolicyAdapter

__all__ = ["WanPolicy", "load_wan_policy"]


class WanPolicy(PolicyAdapter):
    """``model(x [B, C, F', h, w], sigma [B], cond) -> velocity`` (fp32 out), with ``encode_prompts``,
    ``prepare_latents`` (as ``WanPipeline.prepare_latents`` draws them) and ``decode`` (videos)."""

    def __init__(self, pipe, height: int, width: int, num_frames: int, guidance_scale: float,
                 max_sequence_length: int, negative_prompt: str = "") -> None:
        super().__init__(pipe, height, width, guidance_scale, max_sequence_length)
        if getattr(pipe, "transformer_2", None) is not None:
            raise ValueError("Wan 2.2 pipelines with two transformers (transformer_2) are not supported yet")
        s, t = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        if height % s or width % s:
            raise ValueError(f"height and width must be multiples of {s} for this VAE, got {height}x{width}")
        if (num_frames - 1) % t:
            raise ValueError(f"num_frames - 1 must be a multiple of {t} for this VAE, got {num_frames}")
        self.num_frames = num_frames
        self.latent_shape = (pipe.transformer.config.in_channels, (num_frames - 1) // t + 1, height // s, width // s)
        self.negative_prompt = negative_prompt
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.bfloat16, **settings) -> WanPolicy:
        """Wan text-to-video from a local diffusers ``WanPipeline`` folder."""
        from diffusers import WanPipeline

        pipe = WanPipeline.from_pretrained(checked_folder(path, "wan"), torch_dtype=dtype)
        pipe.vae.to(torch.float32)  # the pipeline decodes in the VAE's dtype; Wan's VAE is kept in fp32
        return cls(pipe, **settings)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        dtype = self.dtype
        t = (sigma.float() * 1000.0).to(device=x.device)
        if self.integer_timesteps:
            t = torch.round(t)
        text = cond["prompt_embeds"]
        if self.cfg:
            both = torch.cat([cond["negative_prompt_embeds"], text]).to(dtype)
            return self.classifier_free(lambda xx, tt: self.transformer(
                hidden_states=xx.to(dtype), timestep=tt, encoder_hidden_states=both, return_dict=False)[0], x, t)[0]
        return self.transformer(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=text.to(dtype),
                                return_dict=False)[0].float()

    def encode_batch(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        pe, npe = self._pipe.encode_prompt(prompt=prompts, negative_prompt=[self.negative_prompt] * len(prompts),
                                           do_classifier_free_guidance=self.cfg, num_videos_per_prompt=1,
                                           max_sequence_length=self.max_sequence_length,
                                           device=self.text_device(self.text_encoder))
        return {"prompt_embeds": pe, **({"negative_prompt_embeds": npe} if self.cfg else {})}

    def prepare_latents(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return self.randn((n, *self.latent_shape), generator, device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int = 2) -> torch.Tensor:
        mean, std = latent_stats(self.vae)
        return decode_in_chunks(self.vae, latents, batch, lambda z: z * std.to(z.device) + mean.to(z.device))


def load_wan_policy(path, dtype: torch.dtype = torch.bfloat16, **settings) -> WanPolicy:
    """Wan text-to-video from a local diffusers folder; unset settings take the family's defaults."""
    from .registry import load_family

    return load_family("wan", path, dtype, **settings)
