"""Flux velocity adapter: diffusers' ``FluxTransformer2DModel`` behind the engine's protocol.

Latents are kept *packed* as FluxPipeline keeps them: ``[B, (h/2)(w/2), 4c]`` tokens of 2x2
patches of the ``[B, c, h, w]`` latent image (``pack_latents`` / ``unpack_latents`` are the
pipeline's own static methods, so the layout is diffusers'). The transformer receives
``timestep = sigma`` (diffusers scales by 1000 inside), image ids for RoPE, zero text ids,
and ``guidance`` per row when the model has a guidance embedding (Flux.1-dev: 3.5).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

__all__ = ["FluxVelocity", "pack_latents", "unpack_latents", "latent_image_ids"]


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, c, h, w] -> [B, (h/2)(w/2), 4c]`` (FluxPipeline's 2x2 packing)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2, got {h}x{w}")
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[B, (h/2)(w/2), 4c] -> [B, c, h, w]`` for a latent of ``height x width``."""
    # _unpack_latents takes pixel sizes and a VAE factor; factor 1 means "these are latent sizes"
    return FluxPipeline._unpack_latents(packed, height, width, 1)


def latent_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """RoPE ids ``[(h/2)(w/2), 3]`` of the packed tokens of an ``h x w`` latent."""
    return FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)


class FluxVelocity(torch.nn.Module):
    """``model(x packed [B, N, 4c], sigma [B], cond) -> velocity [B, N, 4c]`` (fp32 out).

    ``cond`` is a dict with ``prompt_embeds [B, L, D]`` (T5 sequence) and
    ``pooled_prompt_embeds [B, Dp]`` (CLIP pooled), one row per latent row.
    """

    def __init__(self, transformer: FluxTransformer2DModel, latent_height: int, latent_width: int,
                 guidance_scale: float | None = 3.5) -> None:
        super().__init__()
        self.transformer = transformer
        self.latent_height, self.latent_width = latent_height, latent_width
        self.guidance_scale = guidance_scale
        self.register_buffer("img_ids", latent_image_ids(latent_height, latent_width), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if not isinstance(cond, Mapping) or "prompt_embeds" not in cond or "pooled_prompt_embeds" not in cond:
            raise ValueError("Flux cond must be a dict with 'prompt_embeds' and 'pooled_prompt_embeds'")
        dtype = self.dtype
        text = cond["prompt_embeds"].to(dtype)
        b = x.shape[0]
        guidance = None
        if self.transformer.config.guidance_embeds:
            if self.guidance_scale is None:
                raise ValueError("this Flux transformer has a guidance embedding: set guidance_scale")
            guidance = torch.full((b,), float(self.guidance_scale), device=x.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=x.to(dtype),
            encoder_hidden_states=text,
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            timestep=sigma.to(device=x.device, dtype=dtype),
            img_ids=self.img_ids.to(dtype),
            txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        return out.float()
