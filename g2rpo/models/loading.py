"""Load the policy a training config names, after checking every file the config names exists."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig, RewardSpec
from ..hub import PATH_OPTIONS, HubError, resolve_path, with_usual_repos
from .registry import family, import_path, load_family

__all__ = ["TORCH_DTYPES", "LoadedPolicy", "check_paths", "load_configured_policy"]

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_paths(model: ModelConfig, rewards: list[RewardSpec], files: dict[str, str | None] | None = None,
                eval_rewards: list[RewardSpec] = ()) -> None:
    """Before anything loads: every file the config names must exist, locally or as a Hugging Face id
    (:mod:`g2rpo.hub`; the cache only when offline): the model, the rewards' files (``eval_rewards``: the
    ``eval:`` section's) and ``files`` (``{key: path}``, e.g. the prompt files; ``builtin:`` names are not files).
    One error lists them all."""
    fam = family(model.kind)
    missing = []
    if not fam.path_optional or model.path:
        if not model.path:
            missing.append(f"model.path is not set (model.kind={model.kind})")
        else:
            try:
                root = resolve_path(model.path, "model.path", diffusers=fam.pipeline is not None)
            except HubError as err:
                missing.append(str(err))
            else:
                missing += [f"model.path: {root / f}" for f in fam.files if not (root / f).exists()]
    for key, value in (files or {}).items():
        if value and not value.startswith("builtin:") and not Path(value).exists():
            missing.append(f"{key}: {value}")
    listed = [("rewards", i, s) for i, s in enumerate(rewards)] + [("eval.rewards", i, s)
                                                                   for i, s in enumerate(eval_rewards)]
    for section, i, spec in listed:
        what = f"{section}[{i}] ({spec.name})"
        options = with_usual_repos(spec.name, spec.options)
        for key in PATH_OPTIONS:
            value = options.get(key)
            if not isinstance(value, str):
                continue
            try:
                if not resolve_path(value, f"{what}.options.{key}").exists():
                    missing.append(f"{what}.options.{key}: {value}")
            except HubError as err:
                missing.append(str(err))
    if missing:
        raise FileNotFoundError("missing files named by the config:\n  " + "\n  ".join(missing))


@dataclass
class LoadedPolicy:
    policy: torch.nn.Module  # the velocity model + encode_prompts / prepare_latents / decode / save_pretrained
    path: Path  # where it was loaded from (the base for exports)


def load_configured_policy(cfg: ModelConfig, log=print) -> LoadedPolicy:
    """Load the policy named by ``cfg`` (a local folder or a Hugging Face id; a family that builds its own
    model, the lab world, builds it on first use when ``path`` is null)."""
    fam = family(cfg.kind)
    if cfg.path:
        path = resolve_path(cfg.path, "model.path", diffusers=fam.pipeline is not None)
    elif fam.default_path is not None:
        path = Path(import_path(fam.default_path)(log=log))
    else:
        raise ValueError(f"model.path must point to a local {fam.title} folder or a Hugging Face id")
    policy = load_family(cfg.kind, path, TORCH_DTYPES[cfg.dtype], height=cfg.height, width=cfg.width,
                         guidance_scale=cfg.guidance_scale, max_sequence_length=cfg.max_sequence_length,
                         **cfg.options)
    return LoadedPolicy(policy, path)
