"""What the adapters share around their pipelines: the checked folder, chunked VAE decoding, latent grids."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["checked_folder", "decode_in_chunks", "latent_stats", "packed_grid"]


@torch.no_grad()
def decode_in_chunks(vae, latents: torch.Tensor, batch: int, to_vae: Callable[[torch.Tensor], torch.Tensor],
                     pick: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> torch.Tensor:
    """``latents`` in ``batch``-row chunks: ``to_vae`` maps fp32 engine latents to the VAE's latent space,
    the VAE decodes, ``pick`` selects the output (a video VAE's frame axis, ...); returns [0, 1] fp32."""
    out = []
    for lo in range(0, latents.shape[0], batch):
        z = to_vae(latents[lo:lo + batch].float())
        img = pick(vae.decode(z.to(vae.dtype), return_dict=False)[0])
        out.append((img.float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


def latent_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(mean, std)`` views ``[1, c, 1, 1, 1]`` of a Wan-family VAE's latent normalisation."""
    cfg = vae.config
    return (torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1),
            torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1))


def packed_grid(vae_factor: int, height: int, width: int) -> tuple[int, int]:
    """The ``(h/2, w/2)`` token grid of an image packed in 2x2 latent patches (Flux, FLUX.2, Qwen-Image);
    the image size must be a multiple of ``2 * vae_factor``."""
    if height % (2 * vae_factor) or width % (2 * vae_factor):
        raise ValueError(f"height and width must be multiples of {2 * vae_factor} for this VAE, got {height}x{width}")
    return height // (2 * vae_factor), width // (2 * vae_factor)


def checked_folder(path, name: str):
    """``path`` as a Path after checking that it holds every file family ``name`` needs (models.registry)."""
    from pathlib import Path

    from .registry import family, require_files

    root = Path(path)
    require_files(root, family(name))
    return root
