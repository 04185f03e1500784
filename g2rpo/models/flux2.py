"""FLUX.2 adapter (diffusers' ``Flux2Transformer2DModel``) behind the engine protocol.

Latents are ``Flux2Pipeline``'s: the VAE latent patchified 2x2 into ``4c`` channels and packed as
``[B, (h/2)(w/2), 4c]`` tokens in raster order, with 4-axis position ids (T, H, W, L) for the image and
the text (the pipeline's own static helpers). The transformer takes ``timestep = sigma`` (the pipeline
divides by 1000) and the embedded guidance (FLUX.2 [dev] is guidance-distilled, 4.0 by default). Text
is Mistral-3's hidden states of ``text_encoder_out_layers`` stacked (padded to ``max_sequence_length``
as the pipeline pads). ``decode`` undoes the VAE's batch-norm statistics and the patchify, and returns
images ``[B, 3, H, W]`` in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..hub import dtype_kwarg
from ._vae import checked_folder, decode_in_chunks, packed_grid
from .base import PolicyAdapter

__all__ = ["Flux2Policy", "load_flux2_policy"]


class Flux2Policy(PolicyAdapter):
    """``model(x packed [B, N, 4c], sigma [B], cond) -> velocity`` (fp32 out), with ``encode_prompts``,
    ``prepare_latents`` (as the pipeline draws and packs them) and ``decode``."""

    def __init__(self, pipe, height: int, width: int, guidance_scale: float | None, max_sequence_length: int,
                 text_encoder_out_layers: Sequence[int] = (10, 20, 30)) -> None:
        super().__init__(pipe, height, width, guidance_scale, max_sequence_length)
        self.grid = packed_grid(pipe.vae_scale_factor, height, width)  # patchified latent (h/2, w/2)
        self.text_encoder_out_layers = tuple(text_encoder_out_layers)
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder
        probe = torch.zeros(1, 1, *self.grid)
        self.register_buffer("img_ids", pipe._prepare_latent_ids(probe)[0], persistent=False)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.bfloat16, **settings) -> Flux2Policy:
        """FLUX.2 from a local diffusers ``Flux2Pipeline`` folder."""
        from diffusers import Flux2Pipeline

        return cls(Flux2Pipeline.from_pretrained(checked_folder(path, "flux2"), **dtype_kwarg(dtype)), **settings)

    @property
    def image_seq_len(self) -> int:
        return self.grid[0] * self.grid[1]  # packed tokens

    def _pipeline_schedule_inputs(self, num_steps: int, config) -> tuple:
        """Flux2Pipeline (diffusers 0.42): ``linspace(1, 1/T, T)`` with ``mu = compute_empirical_mu(image_seq_len,
        T)`` (its own fit; not the scheduler config's sequence lengths)."""
        import numpy as np
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        return np.linspace(1.0, 1 / num_steps, num_steps), compute_empirical_mu(self.image_seq_len, num_steps)

    @property
    def channels(self) -> int:
        return self.transformer.config.in_channels  # 4 x the VAE's latent channels

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        dtype = self.dtype
        b = x.shape[0]
        text = cond["prompt_embeds"]
        guidance = None
        if self.transformer.config.guidance_embeds:
            if self.guidance_scale is None:
                raise ValueError("this FLUX.2 transformer is guidance-distilled: set guidance_scale")
            guidance = torch.full((b,), float(self.guidance_scale), device=x.device, dtype=torch.float32)
        txt_ids = self._pipe._prepare_text_ids(text).to(x.device)
        out = self.transformer(hidden_states=x.to(dtype), timestep=sigma.to(device=x.device, dtype=dtype),
                               guidance=guidance, encoder_hidden_states=text.to(dtype), txt_ids=txt_ids,
                               img_ids=self.img_ids.to(x.device).expand(b, -1, -1), return_dict=False)[0]
        return out[:, : x.shape[1]].float()

    def encode_batch(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        emb, _ = self._pipe.encode_prompt(prompt=prompts, device=self.text_device(self.text_encoder),
                                          max_sequence_length=self.max_sequence_length,
                                          text_encoder_out_layers=self.text_encoder_out_layers)
        return {"prompt_embeds": emb}

    def prepare_latents(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        z = self.randn((n, self.channels, *self.grid), generator, device)
        return self._pipe._pack_latents(z)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int = 4) -> torch.Tensor:
        bn, eps = self.vae.bn, self.vae.config.batch_norm_eps

        def to_vae(z):
            z = z.permute(0, 2, 1).reshape(z.shape[0], self.channels, *self.grid)  # tokens are in raster order
            z = z * torch.sqrt(bn.running_var.view(1, -1, 1, 1).float() + eps).to(z.device) + \
                bn.running_mean.view(1, -1, 1, 1).float().to(z.device)
            return self._pipe._unpatchify_latents(z)

        return decode_in_chunks(self.vae, latents, batch, to_vae)


def load_flux2_policy(path, dtype: torch.dtype = torch.bfloat16, **settings) -> Flux2Policy:
    """FLUX.2 from a local diffusers folder; unset settings take the family's defaults (models.registry)."""
    from .registry import load_family

    return load_family("flux2", path, dtype, **settings)
