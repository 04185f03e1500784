"""Where reward models come from: a name, a ``module:callable`` path, or an entry point.

A reward in a config (``rewards: [{name: ..., options: {...}}]``), in ``python -m g2rpo.eval
--rewards`` and in the lab tools is resolved, in this order, from

1. the built-in rewards (``hps``, ``clip``, ``pickscore``, ``imagereward``, ``unified_reward``, and
   the lab world's ``digit_alignment``, ``digit_realism``), imported only when used;
2. rewards registered at run time with :func:`register_reward`;
3. the entry point group ``g2rpo.rewards`` of installed packages (``name = "pkg.module:callable"``);
4. a ``module:callable`` path, e.g. ``my_pkg.rewards:brightness``.

The callable is one of

* a **scoring function** ``fn(images, prompts, **options) -> [N]`` (the options do not fill its required
  parameters, ``images`` and ``prompts`` do; the options are passed as keywords on every call);
* a **class** or **builder** ``(**options) -> reward``: the reward has ``score(images, prompts)``, or
  is itself callable as ``(images, prompts)``.

Images are ``[N, C, H, W]`` floats in [0, 1] (``[N, H, W]`` for the 1-channel lab world); scores are
anything ``torch.as_tensor`` takes, one per image.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

import torch

from .base import RewardModel

__all__ = ["BUILTIN_REWARDS", "ENTRY_POINT_GROUP", "REWARD_BUILDERS", "CallableReward", "known_rewards",
           "make_reward", "register_reward", "resolve_reward"]

ENTRY_POINT_GROUP = "g2rpo.rewards"
#: The built-in rewards, by import path (nothing is imported until a reward is built).
BUILTIN_REWARDS = {
    "hps": "g2rpo.rewards.clip_models:load_hps",
    "clip": "g2rpo.rewards.clip_models:load_clip_score",
    "first_frame": "g2rpo.rewards.first_frame:load_first_frame",
    "pickscore": "g2rpo.rewards.clip_models:load_pickscore",
    "imagereward": "g2rpo.rewards.imagereward:load_imagereward",
    "unified_reward": "g2rpo.rewards.unified_reward:load_unified_reward",
    "remote": "g2rpo.rewards.remote:remote_reward",
    "vlm_judge": "g2rpo.rewards.remote:vlm_judge",
    "random_control": "g2rpo.rewards.control:RandomControl",
    "digit_alignment": "g2rpo.lab.rewards:build_alignment",
    "digit_realism": "g2rpo.lab.rewards:build_realism",
    "digit_judge": "g2rpo.lab.rewards:build_judge",
    "scene_clip": "g2rpo.lab.scenes.world:build_scene_clip",
    "scene_preference": "g2rpo.lab.scenes.world:build_scene_preference",
    "scene_detector": "g2rpo.lab.scenes.world:build_scene_detector",
    "scene_exact": "g2rpo.lab.scenes.judge:build_exact",
}
#: Rewards registered at run time by :func:`register_reward`.
REWARD_BUILDERS: dict[str, Callable[..., Any]] = {}


def register_reward(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register a builder ``(**options) -> reward`` (or a scoring function) under ``name``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in REWARD_BUILDERS or name in BUILTIN_REWARDS:
            raise ValueError(f"reward {name!r} is registered twice")
        REWARD_BUILDERS[name] = fn
        return fn

    return deco


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def known_rewards() -> list[str]:
    """Every reward name that resolves without a ``module:callable`` path."""
    return sorted(set(BUILTIN_REWARDS) | set(REWARD_BUILDERS) | set(_entry_points()))


def _import(path: str, what: str) -> Any:
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ValueError(f"{what}: {path!r} is not a module:callable path")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as err:
        raise ValueError(f"{what}: cannot import module {module!r} ({err})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{what}: module {module!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"{what}: {path} is not callable")
    return obj


def resolve_reward(name: str) -> Callable[..., Any]:
    """The callable behind a reward name (see the module docstring); ValueError names what is wrong."""
    if name in BUILTIN_REWARDS:
        return _import(BUILTIN_REWARDS[name], f"built-in reward {name!r}")
    if name in REWARD_BUILDERS:
        return REWARD_BUILDERS[name]
    eps = _entry_points()
    if name in eps:
        try:
            obj = eps[name].load()
        except Exception as err:  # noqa: BLE001  (a broken plug-in: name it)
            raise ValueError(f"reward {name!r}: entry point {eps[name].value!r} of group {ENTRY_POINT_GROUP} "
                             f"failed to load ({type(err).__name__}: {err})") from None
        if not callable(obj):
            raise ValueError(f"reward {name!r}: entry point {eps[name].value!r} is not callable")
        return obj
    if ":" in name:
        return _import(name, f"reward {name!r}")
    raise ValueError(f"unknown reward {name!r}; known: {known_rewards()}, or a module:callable path "
                     f"(e.g. my_pkg.rewards:brightness), or an entry point of group {ENTRY_POINT_GROUP}")


def takes_prompt_file(name: str) -> bool:
    """Whether reward ``name``'s builder takes a ``prompt_file`` option (the run's prompt file is then its
    default: a reward that reads each prompt's conditioning image)."""
    try:
        obj = resolve_reward(name)
        return "prompt_file" in inspect.signature(obj).parameters
    except (ValueError, TypeError):
        return False


def _is_scoring_function(obj: Callable[..., Any], options: dict[str, Any]) -> bool:
    """Not a class, and called as ``fn(images, prompts, **options)``: the options alone do not fill its required
    parameters, two positional arguments more do. (A builder's required parameters are all options.)"""
    if inspect.isclass(obj):
        return False
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return False
    try:
        sig.bind(**options)
        return False  # the options fill it: a builder
    except TypeError:
        pass
    try:
        sig.bind(None, None, **options)
        return True
    except TypeError:
        return False


class CallableReward:
    """A scoring callable as a :class:`RewardModel`: scores as a float ``[N]`` tensor, checked."""

    def __init__(self, fn: Callable[[torch.Tensor, Sequence[str]], Any], name: str) -> None:
        self.fn, self.name = fn, name

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        out = torch.as_tensor(self.fn(images, list(prompts))).float().flatten().cpu()
        if out.numel() != images.shape[0]:
            raise ValueError(f"reward {self.name!r} returned {out.numel()} scores for {images.shape[0]} images")
        return out


def make_reward(name: str, **options: Any) -> RewardModel:
    """Build a reward by name, entry point or ``module:callable`` path, with its options."""
    obj = resolve_reward(name)
    if _is_scoring_function(obj, options):
        fn = functools.partial(obj, **options) if options else obj
        return CallableReward(fn, name)
    try:
        inspect.signature(obj).bind(**options)
    except TypeError as err:
        raise TypeError(f"reward {name!r}: options {sorted(options)} do not fit {getattr(obj, '__name__', obj)}"
                        f"{inspect.signature(obj)} ({err})") from None
    except ValueError:  # no signature (a builtin): let the call decide
        pass
    model = obj(**options)
    if hasattr(model, "score") and callable(model.score):
        if not hasattr(model, "name"):
            try:
                model.name = name
            except AttributeError:
                pass
        return model
    if callable(model):
        return CallableReward(model, name)
    raise ValueError(f"reward {name!r}: {getattr(obj, '__name__', obj)}(**options) returned "
                     f"{type(model).__name__}, which has no score(images, prompts) and is not callable")
