"""Policy adapters: velocity models behind the engine's ``model(x, sigma, cond)`` protocol (:mod:`.base`),
one file per model family, loaded from local diffusers folders through the family registry (:mod:`.registry`).

The adapters import diffusers: they are imported when first named (``from g2rpo.models import FluxPolicy``),
so that the registry can be read without loading diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from .registry import FAMILIES, ModelFamily, family, family_of_folder, family_of_pipeline, load_family

_LAZY = {
    "PolicyAdapter": ".base",
    "FluxPolicy": ".flux", "FluxVelocity": ".flux", "latent_image_ids": ".flux", "load_flux_policy": ".flux",
    "pack_latents": ".flux", "unpack_latents": ".flux",
    "Flux2Policy": ".flux2", "load_flux2_policy": ".flux2",
    "QwenImagePolicy": ".qwen_image", "load_qwen_image_policy": ".qwen_image",
    "SD3Policy": ".sd3", "load_sd3_policy": ".sd3",
    "WanPolicy": ".wan", "WanExperts": ".wan", "load_wan_policy": ".wan",
    "WanI2VPolicy": ".wan_i2v",
}

__all__ = ["FAMILIES", "ModelFamily", "family", "family_of_folder", "family_of_pipeline", "load_family", "load_policy",
           *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_policy(kind: str, path, dtype: torch.dtype = torch.bfloat16, **settings):
    """``load_policy(family, path, dtype=..., height=..., ...)`` from a local folder; settings left unset (or
    None) take the family's defaults (:data:`FAMILIES`)."""
    return load_family(kind, path, dtype, **settings)
