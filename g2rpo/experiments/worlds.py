"""The lab worlds the comparison runs on, each behind one interface: how to build it, what a training run resets
to it, which rewards are in-domain, which judge decides, how to evaluate a policy and draw its grid."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..lab.scale import world_reset

__all__ = ["WorldSpec", "WORLDS", "world_spec"]


@dataclass(frozen=True)
class WorldSpec:
    name: str
    marker: str  # the file a built world's folder holds
    in_domain: tuple[str, ...]  # the training rewards (weights 1)
    judge: str  # the out-of-domain metric the comparison ranks by
    cols: tuple[str, ...]  # the table's metric columns
    reset: dict  # what a preset's model, reward and prompt keys are reset to (the world's own)
    build: Callable[..., Path]
    load_policy: Callable[[Path], Any]
    # (policy, world, steps, held_out, size, cache) -> {metric: value}; size: "final" or "curve"
    evaluate: Callable[..., dict[str, float]]
    grid: Callable[[Any], tuple[torch.Tensor, list[str], int]]  # (images, row labels, images per row)
    extra: dict = field(default_factory=dict)

    def score(self, ev: dict[str, float]) -> float:
        """The training reward's combination (each in-domain reward at weight 1)."""
        return float(sum(ev[k] for k in self.in_domain))


# ---- digits ----
def _digits_evaluate(policy, world: Path, steps: int, held_out: bool, size: str, cache: dict) -> dict[str, float]:
    from ..lab.world import evaluate_lab, load_judge, load_rewards

    if "judge" not in cache:
        cache["judge"], cache["rewards"] = load_judge(world), load_rewards(world)
    per_class = cache.get(f"{size}_per_class", 20 if size == "final" else 10)
    return evaluate_lab(policy, world, per_class=per_class, steps=steps, test_prompts=held_out, judge=cache["judge"],
                        rewards=cache["rewards"])


def _digits_grid(policy) -> tuple[torch.Tensor, list[str], int]:
    from ..lab.world import lab_prompts_for, sample_images

    labels = [c for c in range(10) for _ in range(6)]
    return sample_images(policy, lab_prompts_for(labels, test=True), steps=16, seed=777), \
        [str(d) for d in range(10)], 6


def _digits_build(log=None) -> Path:
    from ..lab.world import build_world

    return build_world(log=log)


def _digits_load(world: Path):
    from ..lab.generator import load_lab_policy

    return load_lab_policy(world)


# ---- scenes ----
def _scenes_evaluate(policy, world: Path, steps: int, held_out: bool, size: str, cache: dict) -> dict[str, float]:
    from ..lab.scenes.judge import SceneExact
    from ..lab.scenes.world import build_scene_detector, evaluate_scenes, scene_rewards

    if "rewards" not in cache:
        cache["rewards"], cache["judges"] = scene_rewards(world), (SceneExact(), build_scene_detector(world))
    per_prompt = cache.get(f"{size}_per_prompt", 4 if size == "final" else 2)
    return evaluate_scenes(policy, world, steps=steps, per_prompt=per_prompt, prompts="test" if held_out else "train",
                           rewards=cache["rewards"], judges=cache["judges"])


GRID_PROMPTS = 12


def _scenes_grid(policy) -> tuple[torch.Tensor, list[str], int]:
    from ..lab.scenes.world import sample_scenes, scene_prompts

    prompts = scene_prompts("test")
    prompts = prompts[:: max(1, len(prompts) // GRID_PROMPTS)][:GRID_PROMPTS]
    return sample_scenes(policy, [p for p in prompts for _ in range(6)], steps=16, seed=777), prompts, 6


def _scenes_build(log=None) -> Path:
    from ..lab.scenes.world import build_scene_world

    return build_scene_world(log=log)


def _scenes_load(world: Path):
    from ..lab.scenes.world import load_scene_policy

    return load_scene_policy(world)


WORLDS: dict[str, WorldSpec] = {
    "digits": WorldSpec(
        "digits", "lab_world.json", ("digit_alignment", "digit_realism"), "judge_accuracy",
        ("digit_alignment", "digit_realism", "judge_accuracy", "judge_realism", "diversity"),
        world_reset("digits"),
        _digits_build, _digits_load, _digits_evaluate, _digits_grid),
    "scenes": WorldSpec(
        "scenes", "scene_world.json", ("scene_clip", "scene_preference"), "scene_exact",
        ("scene_clip", "scene_preference", "scene_exact", "scene_detector", "scene_exact/counting",
         "scene_exact/position", "scene_exact/color_attr", "scene_exact/heldout_pairs", "diversity"),
        world_reset("scenes"),
        _scenes_build, _scenes_load, _scenes_evaluate, _scenes_grid),
}


def world_spec(name: str) -> WorldSpec:
    try:
        return WORLDS[name]
    except KeyError:
        raise ValueError(f"unknown lab world {name!r}; known: {', '.join(WORLDS)}") from None
