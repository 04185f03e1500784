"""Build the policy and the reward models a training config names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, ModelConfig, RewardSpec
from .hub import PATH_OPTIONS, HubError, resolve_path, reward_options, with_usual_repos
from .rewards import FrameAggregated, RewardModel, make_reward
from .rewards.registry import takes_prompt_file

__all__ = ["TORCH_DTYPES", "LoadedPolicy", "load_configured_policy", "build_rewards", "check_paths", "check_world_rewards", "plan_trained_experts", "resolve_trained_experts"]


def check_world_rewards(model: ModelConfig, rewards: list[RewardSpec]) -> None:
    """Before anything loads: a lab world's reward scores that world's images only (the digits' one channel, the
    scenes' 16x16 RGB). ConfigError naming the reward and what to set instead."""
    from .models.registry import FAMILIES

    mine = FAMILIES[model.kind]
    for i, r in enumerate(rewards):
        owner = next((f for f in FAMILIES.values() if r.name in f.world_rewards), None)
        if owner is not None and owner.name != mine.name:
            own = (", ".join(mine.world_rewards) if mine.world_rewards else
                   "a reward for its images (hps, clip, pickscore, imagereward, ..., or your own)")
            raise ConfigError(f"rewards[{i}].name: {r.name} scores {owner.title}'s images, not {mine.title}'s "
                              f"(model.kind={mine.name}); set rewards to {own}")


def check_paths(model: ModelConfig, rewards: list[RewardSpec]) -> None:
    """Before anything loads: every file the config names must exist, locally or as a Hugging Face id
    (:mod:`g2rpo.hub`; the cache only when offline). One error lists them all."""
    from .models.registry import family

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
    for i, spec in enumerate(rewards):
        what = f"rewards[{i}] ({spec.name})"
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


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedPolicy:
    policy: torch.nn.Module  # the velocity model + encode_prompts / prepare_latents / decode / save_pretrained
    path: Path  # where it was loaded from (the base for exports)


def load_configured_policy(cfg: ModelConfig, log=print) -> LoadedPolicy:
    """Load the policy named by ``cfg`` (a local folder or a Hugging Face id; a family that builds its own
    model, the lab world, builds it on first use when ``path`` is null)."""
    from .models.registry import family, import_path, load_family

    fam = family(cfg.kind)
    if cfg.path:
        path = resolve_path(cfg.path, "model.path", diffusers=fam.pipeline is not None)
    elif fam.default_path is not None:
        path = Path(import_path(fam.default_path)(log=log))
    else:
        raise ValueError(f"model.path must point to a local {fam.title} folder or a Hugging Face id")
    policy = load_family(cfg.kind, path, TORCH_DTYPES[cfg.dtype], height=cfg.height, width=cfg.width,
                         guidance_scale=cfg.guidance_scale, max_sequence_length=cfg.max_sequence_length,
                         num_frames=cfg.num_frames, text_encoder_out_layers=cfg.text_encoder_out_layers,
                         guidance_scale_2=cfg.guidance_scale_2)
    return LoadedPolicy(policy, path)


#: model.train_experts aliases by noise level.
EXPERT_ALIASES = {"high": "transformer", "low": "transformer_2"}


def plan_trained_experts(cfg, names: tuple[str, ...], expert_of_sigma) -> tuple[tuple[str, ...], dict[str, list[int]]]:
    """``(trained experts, {expert: SDE steps it owns})`` for a :class:`TrainConfig` (``model.train_experts``) and a
    model with experts ``names`` routed by ``expert_of_sigma(sigma)``: ``auto`` takes those that own the SDE steps
    the strategy can train over the run (their sigma as the model sees it). A trained SDE step owned by a frozen
    expert raises ValueError: no gradient could reach it. A one-transformer model trains it."""
    from .rollout.strategies import make_strategy
    from .schedule import model_timesteps, sigma_schedule

    choice = EXPERT_ALIASES.get(cfg.model.train_experts, cfg.model.train_experts)
    if len(names) == 1:
        if choice not in ("auto", "both", names[0]):
            raise ValueError(f"model.train_experts={cfg.model.train_experts}: this model has one transformer")
        return names, {}
    s = cfg.sampler
    strategy = make_strategy(s.strategy, **s.strategy_options())
    steps = sorted({e for it in range(cfg.iterations) for e in strategy.sde_steps(it)})
    sig = sigma_schedule(s.num_steps, s.static_shift, s.schedule_precision)  # multi-expert families: the shift schedule
    seen = model_timesteps(sig, s.quantize_timesteps)  # the noise level the model is given (and routed by)
    owner = {e: expert_of_sigma(float(seen[e])) for e in steps}
    trained = (tuple(n for n in names if n in owner.values()) if choice == "auto"
               else names if choice == "both" else (choice,))
    frozen = {e: o for e, o in owner.items() if o not in trained}
    if frozen:
        raise ValueError(f"model.train_experts={cfg.model.train_experts}: the SDE steps {sorted(frozen)} (sigma "
                         f"{', '.join(f'{float(sig[e]):.3f}' for e in sorted(frozen))}) are predicted by the frozen "
                         f"{', '.join(sorted(set(frozen.values())))}; train it too (auto or both) or keep sampler."
                         f"sde_indices on {', '.join(trained)}")
    return trained, {n: [e for e in steps if owner[e] == n] for n in names}


def resolve_trained_experts(cfg, policy, log=print) -> tuple[str, ...]:
    """Set and return the experts ``policy`` trains (:func:`plan_trained_experts`); logs which, and the SDE steps
    each owns, for a model with several."""
    names = policy.expert_names()
    trained, by = plan_trained_experts(cfg, names, policy.expert_of_sigma)
    policy.set_trained_experts(trained)
    if len(names) > 1:
        log(f"experts: trained {', '.join(trained)}; SDE steps by expert: " + "; ".join(f"{n} {by[n]}" for n in names))
    return trained


def build_rewards(specs: list[RewardSpec], model_cfg: ModelConfig, model_path: Path,
                  prompt_file: str | None = None) -> list[tuple[str, RewardModel, float]]:
    """``[(name, model, weight)]``; a family's world rewards (the lab's) default to the policy's folder."""
    from .models.registry import family

    world_rewards = family(model_cfg.kind).world_rewards
    out = []
    for spec in specs:
        options = reward_options(spec.name, spec.options, f"rewards ({spec.name})")
        if spec.name in world_rewards:
            options.setdefault("world", str(model_path))
        if prompt_file is not None and takes_prompt_file(spec.name):  # e.g. first_frame: the conditioning images
            options.setdefault("prompt_file", prompt_file)
        out.append((spec.name, FrameAggregated(make_reward(spec.name, **options), spec.frames), spec.weight))
    return out
