"""The lab world on disk: build once (base model + reward weights), load many times."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from ..rewards.base import WeightedRewards
from .data import load_splits
from .generator import LabPolicy, LabWorldConfig, build_base_model, load_lab_policy
from .prompts import class_prompts
from .rewards import OODJudge, config_of as _config_of, fit_alignment, load_rewards

__all__ = ["default_cache_dir", "build_world", "load_rewards", "load_judge", "lab_prompts_for", "sample_images"]


def default_cache_dir() -> Path:
    """``$G2RPO_CACHE/lab`` or ``~/.cache/g2rpo/lab``."""
    root = os.environ.get("G2RPO_CACHE") or Path.home() / ".cache" / "g2rpo"
    return Path(root) / "lab"


def _is_built(folder: Path, config: LabWorldConfig) -> bool:
    cfg = folder / "lab_world.json"
    needed = [cfg, folder / "transformer" / "diffusion_pytorch_model.safetensors",
              folder / "text_encoder" / "model.safetensors", folder / "rewards" / "digit_alignment.safetensors"]
    return all(f.is_file() for f in needed) and json.loads(cfg.read_text()) == asdict(config)


def build_world(folder: str | Path | None = None, config: LabWorldConfig = LabWorldConfig(), force: bool = False,
                log=print) -> Path:
    """Build (or reuse, when built with the same config) the base model and reward weights in ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder) if folder is not None else default_cache_dir() / "base"
    if not force and _is_built(folder, config):
        if log:
            log(f"lab world already built in {folder}")
        return folder
    policy = build_base_model(config, log=log)
    tmp = folder.with_name(folder.name + ".tmp")
    policy.save_pretrained(tmp)
    coef, intercept = fit_alignment(load_splits(config.seed, config.image_size), config.seed)
    (tmp / "rewards").mkdir(exist_ok=True)
    save_file({"coef": coef, "intercept": intercept}, str(tmp / "rewards" / "digit_alignment.safetensors"))
    publish(tmp, folder)
    if log:
        log(f"lab world built in {folder}")
    return folder


def publish(tmp: Path, folder: Path) -> None:
    """Move a finished build from ``tmp`` to ``folder`` (replacing it): a crash mid-build never leaves a
    half-written world behind."""
    import shutil

    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def combined_reward(world: str | Path, weights: dict[str, float] | None = None) -> WeightedRewards:
    """A weighted combination of the in-domain rewards (default alignment 1, realism 1)."""
    weights = weights or {"digit_alignment": 1.0, "digit_realism": 1.0}
    rewards = load_rewards(world)
    unknown = set(weights) - set(rewards)
    if unknown:
        raise ValueError(f"unknown lab rewards {sorted(unknown)}; have {sorted(rewards)}")
    return WeightedRewards([rewards[k] for k in weights], list(weights.values()), name="lab_combined")


def load_judge(world: str | Path) -> OODJudge:
    cfg = _config_of(Path(world))
    return OODJudge(load_splits(cfg.seed, cfg.image_size))


def lab_prompts_for(labels: list[int], test: bool = False) -> list[str]:
    """One prompt per label (the first paraphrase, or the held-out one with ``test=True``)."""
    return [class_prompts(int(label), test=test)[0] for label in labels]


@torch.no_grad()
def sample_images(policy: LabPolicy, prompts: list[str], steps: int = 16, seed: int = 0, shift: float = 3.0,
                  max_batch: int | None = 256) -> torch.Tensor:
    """ODE samples ``[N, S, S]`` in [0, 1] for the prompts (noise from ``seed``)."""
    from ..rollout.engine import RolloutEngine

    noise = policy.prepare_latents(len(prompts), torch.Generator().manual_seed(seed))
    engine = RolloutEngine(policy, num_steps=steps, shift=shift, max_batch=max_batch)
    latents = engine.sample_ode(noise, policy.encode_prompts(prompts))
    return policy.decode(latents)[:, 0]


__all__ += ["combined_reward", "load_lab_policy", "LabWorldConfig"]


@torch.no_grad()
def evaluate_lab(policy: LabPolicy, world: str | Path, per_class: int = 20, steps: int = 16, seed: int = 12345,
                 test_prompts: bool = True, judge: OODJudge | None = None,
                 rewards: dict[str, object] | None = None) -> dict[str, float]:
    """In-domain rewards and out-of-domain judges of ODE samples (``per_class`` per digit).

    Uses the held-out paraphrases (``test_prompts``) and fixed noise, so two policies are
    compared on identical inputs.
    """
    judge = judge or load_judge(world)
    rewards = rewards or load_rewards(world)
    labels = [c for c in range(10) for _ in range(per_class)]
    prompts = lab_prompts_for(labels, test=test_prompts)
    images = sample_images(policy, prompts, steps=steps, seed=seed)
    out = {name: float(r.score(images, prompts).mean()) for name, r in rewards.items()}
    out.update(judge.evaluate(images, torch.tensor(labels), torch.tensor(labels)))
    return out


__all__ += ["evaluate_lab"]
