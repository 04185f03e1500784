"""Policy adapters: velocity models behind the engine's ``model(x, sigma, cond)`` protocol."""

from .flux import FluxVelocity, latent_image_ids, pack_latents, unpack_latents

__all__ = ["FluxVelocity", "latent_image_ids", "pack_latents", "unpack_latents"]
