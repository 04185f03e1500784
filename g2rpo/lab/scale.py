"""A method preset at lab scale: what ``python -m g2rpo.train --config configs/methods/<preset>.yaml --lab digits``
(or ``scenes``) puts over the preset, and what the method comparison resets every preset to.

The presets are written for Flux (their T, G, M, iterations, learning rate, rewards, pipeline schedule and LoRA
are Flux-scale). At lab scale every method keeps its own method keys (strategy, eta, windows, clipping, advantage
and update conventions) and takes the world's model, rewards, prompts and static shift-3 schedule (a lab world has
no pipeline scheduler), the comparison's common scale (T = 16, G = 8, M = the first 4 steps) and the world's lab
config's run length and learning rate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["LAB_WORLDS", "LAB_SCHEDULE", "LAB_SCALE", "lab_config_path", "world_reset", "at_lab_scale"]

#: The lab worlds: name -> (its lab config in g2rpo.configs, the marker file of its folders)
LAB_WORLDS = {"digits": ("lab.yaml", "lab_world.json"), "scenes": ("lab_scenes.yaml", "scene_world.json")}
#: A lab world has no pipeline scheduler: every method samples on the static shift 3 (a preset's pipeline schedule,
#: Flow-GRPO's FluxPipeline or SD3 one, is the Flux/SD3 world's own, reset here as the model is).
LAB_SCHEDULE = {"schedule": "shift", "shift": 3.0, "dynamic_shift": False}
#: The same scale for every method (the presets' T, G and M are Flux-scale).
LAB_SCALE = {"sampler": {"num_steps": 16, "group_size": 8, "sde_indices": [0, 1, 2, 3], "max_batch": 512}}
#: What the world's lab config decides over a preset (run length, learning rate, where the run goes).
_RUN_KEYS = ("iterations", "train_batch", "checkpoint_every", "image_every", "output_dir")


def _check(world: str) -> None:
    if world not in LAB_WORLDS:
        raise ValueError(f"unknown lab world {world!r}; known: {', '.join(LAB_WORLDS)}")


def lab_config_path(world: str) -> Path:
    """The world's lab config (``configs/lab.yaml``, ``configs/lab_scenes.yaml``), shipped as ``g2rpo.configs``."""
    from importlib import resources

    _check(world)
    return Path(str(resources.files("g2rpo.configs").joinpath(LAB_WORLDS[world][0])))


def world_reset(world: str) -> dict[str, Any]:
    """The model, LoRA, schedule, reward and prompt keys of a preset, reset to the world's own."""
    from ..config import read_config_file
    from ..models.registry import FAMILIES

    _check(world)
    marker = LAB_WORLDS[world][1]
    kind = next(f.name for f in FAMILIES.values() if f.marker == marker)
    own = read_config_file(lab_config_path(world))
    return {"model": {"kind": kind, "path": None, "dtype": "float32", "cfg_detach_uncond": False, "height": None,
                      "width": None, "max_sequence_length": None, "guidance_scale": None},
            "lora": {"enabled": False}, "sampler": dict(LAB_SCHEDULE),
            "rewards": [dict(r) for r in own["rewards"]],
            "data": {"prompts": own["data"]["prompts"], "prompts_per_iteration": own["data"]["prompts_per_iteration"]}}


def at_lab_scale(world: str) -> dict[str, Any]:
    """``--lab WORLD``: the world's reset, the common lab scale, and the lab config's run length, learning rate
    and output folder (the command line still overrides any of them)."""
    from ..config import merge_dicts, read_config_file

    own = read_config_file(lab_config_path(world))
    run = {k: own[k] for k in _RUN_KEYS if k in own}
    run["optim"] = {"lr": own["optim"]["lr"]}
    return merge_dicts(merge_dicts(world_reset(world), LAB_SCALE), run)
