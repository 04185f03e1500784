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

from ..hub import dtype_kwarg
from ._vae import checked_folder, decode_in_chunks, packed_grid
from .base import PolicyAdapter

__all__ = ["FluxPolicy", "FluxVelocity", "FluxVelocityAdapter", "latent_image_ids", "load_flux_policy", "pack_latents",
           "unpack_latents"]


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
                 guidance_scale: float | None) -> None:
        super().__init__()
        self.transformer = transformer
        self.latent_height, self.latent_width = latent_height, latent_width
        self.guidance_scale = guidance_scale
        self.compute_dtype: torch.dtype | None = None  # the inputs' dtype (see models.base)
        self.register_buffer("img_ids", latent_image_ids(latent_height, latent_width), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype or next(self.transformer.parameters()).dtype

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


class FluxVelocityAdapter(PolicyAdapter):
    """An adapter whose velocity is a :class:`FluxVelocity` (Flux.1 and the lab world): the transformer and
    the input dtype live in ``self.velocity``."""

    velocity: FluxVelocity

    @property
    def transformer(self) -> FluxTransformer2DModel:
        return self.velocity.transformer

    def set_transformer(self, module: torch.nn.Module) -> None:
        self.velocity.transformer = module

    @property
    def compute_dtype(self) -> torch.dtype | None:
        return self.velocity.compute_dtype if "velocity" in self._modules else self.__dict__.get("_dtype")

    @compute_dtype.setter
    def compute_dtype(self, value: torch.dtype | None) -> None:
        if "velocity" in self._modules:
            self.velocity.compute_dtype = value
        else:  # set by PolicyAdapter.__init__ before the velocity exists
            self.__dict__["_dtype"] = value

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.velocity(x, sigma, cond)


class FluxPolicy(FluxVelocityAdapter):
    """Flux.1 from a local diffusers folder, behind the engine protocol.

    ``encode_prompts(list[str]) -> cond`` (T5 ``prompt_embeds`` padded to
    ``max_sequence_length`` + CLIP ``pooled_prompt_embeds``; cached per prompt),
    ``prepare_latents(n, generator)`` (packed noise, as FluxPipeline draws it),
    ``__call__(x, sigma, cond)`` (:class:`FluxVelocity`), ``decode(latents) -> [n, 3, H, W]``
    in [0, 1] (VAE scaling and shift read from the VAE config).
    """

    def __init__(self, pipe: FluxPipeline, height: int, width: int, guidance_scale: float | None,
                 max_sequence_length: int) -> None:
        super().__init__(pipe, height, width, guidance_scale, max_sequence_length)
        gh, gw = packed_grid(pipe.vae_scale_factor, height, width)
        self.latent_height, self.latent_width = 2 * gh, 2 * gw
        self.velocity = FluxVelocity(pipe.transformer, self.latent_height, self.latent_width, guidance_scale)
        self.vae = pipe.vae
        self.text_encoder, self.text_encoder_2 = pipe.text_encoder, pipe.text_encoder_2

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.bfloat16, **settings) -> FluxPolicy:
        """Flux from a local diffusers folder (``model_index.json`` + component folders)."""
        return cls(FluxPipeline.from_pretrained(checked_folder(path, "flux"), **dtype_kwarg(dtype)), **settings)

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    @property
    def image_seq_len(self) -> int:
        return (self.latent_height // 2) * (self.latent_width // 2)

    def encode_batch(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = self._pipe.encode_prompt(prompt=prompts, prompt_2=None,
                                                     device=self.text_device(self.text_encoder_2),
                                                     num_images_per_prompt=1,
                                                     max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def prepare_latents(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        shape = (n, self.latent_channels, self.latent_height, self.latent_width)
        return pack_latents(self.randn(shape, generator, device))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int = 8) -> torch.Tensor:
        cfg = self.vae.config
        return decode_in_chunks(self.vae, latents, batch, lambda z: unpack_latents(
            z, self.latent_height, self.latent_width) / cfg.scaling_factor + (cfg.shift_factor or 0.0))


def load_flux_policy(path, dtype: torch.dtype = torch.bfloat16, **settings) -> FluxPolicy:
    """Flux from a local diffusers folder; unset settings take the family's defaults (models.registry)."""
    from .registry import load_family

    return load_family("flux", path, dtype, **settings)
