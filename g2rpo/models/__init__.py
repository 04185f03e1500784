"""Policy adapters: velocity models behind the engine's ``model(x, sigma, cond)`` protocol,
loaded from local diffusers folders (nothing is downloaded)."""

from __future__ import annotations

import torch

from .flux import FluxPolicy, FluxVelocity, latent_image_ids, load_flux_policy, pack_latents, unpack_latents
from .sd3 import SD3Policy, load_sd3_policy
from .flux2 import Flux2Policy, load_flux2_policy
from .qwen_image import QwenImagePolicy, load_qwen_image_policy
from .wan import WanPolicy, load_wan_policy

__all__ = ["FluxPolicy", "FluxVelocity", "SD3Policy", "latent_image_ids", "load_flux_policy", "load_policy",
           "load_flux2_policy", "load_qwen_image_policy", "load_sd3_policy", "load_wan_policy", "pack_latents", "unpack_latents",
           "Flux2Policy", "QwenImagePolicy", "WanPolicy"]


def load_policy(kind: str, path, dtype: torch.dtype = torch.bfloat16, height: int | None = None,
                width: int | None = None, guidance_scale: float | None = None,
                max_sequence_length: int | None = None, num_frames: int | None = None,
                text_encoder_out_layers=None) -> torch.nn.Module:
    """``load_policy("flux" | "flux2" | "sd3" | "qwen_image" | "wan", path, dtype=...)`` from a local diffusers folder
    (for Qwen-Image ``guidance_scale`` is the pipeline's ``true_cfg_scale``)."""
    kw = {k: v for k, v in dict(height=height, width=width, guidance_scale=guidance_scale,
                                max_sequence_length=max_sequence_length).items() if v is not None}
    if kind == "flux2":
        return load_flux2_policy(path, dtype=dtype, **kw, **({"text_encoder_out_layers": text_encoder_out_layers}
                                                            if text_encoder_out_layers else {}))
    if kind == "qwen_image":
        return load_qwen_image_policy(path, dtype=dtype, **kw)
    if kind == "wan":
        return load_wan_policy(path, dtype=dtype, **kw, **({"num_frames": num_frames} if num_frames else {}))
    if kind == "flux":
        return load_flux_policy(path, dtype=dtype, **kw)
    if kind == "sd3":
        return load_sd3_policy(path, dtype=dtype, **kw)
    raise ValueError(f"unknown policy kind {kind!r}: use 'flux', 'flux2', 'sd3', 'qwen_image' or 'wan' (or model.kind=lab for the lab world)")
