"""Resume: the newest loadable checkpoint restores the weights, optimizer, EMA and RNG, and hands each stateful
component (``state_dict`` / ``load_state_dict``: the update, the cost meter, the granularity controller) its own
state; a damaged checkpoint falls back to the previous one, a crafted one stops the run."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.distributed.checkpoint.api import CheckpointException

from ..checkpoint import load_checkpoint
from ..config import ConfigError
from ..distributed import DistContext
from ..safeload import UnsafeFileError

__all__ = ["Stateful", "component_states", "restore_newest"]

#: Where trainer states written before the components kept their own put each component's state.
_LEGACY = {"update": lambda s: {"optimizer_steps_done": s.get("optimizer_steps_done", 0), "scheduler": s["scheduler"]},
           "cost": lambda s: {"totals": s.get("cost_totals", {})},
           "granularity": lambda s: s.get("auto_granularities")}


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def component_states(components: dict[str, Stateful]) -> dict[str, dict[str, Any]]:
    """What a checkpoint's trainer state keeps of the components: ``{name: component.state_dict()}``."""
    return {name: c.state_dict() for name, c in components.items()}


def restore_newest(ctx: DistContext, candidates: list[Path], module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   ema: dict[str, torch.Tensor] | None, components: dict[str, Stateful], log=print
                   ) -> tuple[Path, dict[str, Any]]:
    """Load the newest loadable of ``candidates`` (newest first) into the model, optimizer, EMA and
    ``components``; returns it and its trainer state. A damaged one (truncated DCP files, a missing or cut
    trainer state) falls back, with a warning, to the previous; a file that would run code stops (ConfigError)."""
    for ckpt in candidates:
        try:
            state = load_checkpoint(ctx, ckpt, module, optimizer, ema)
        except UnsafeFileError as err:
            raise ConfigError(f"--resume: {err}") from None
        except (Exception, CheckpointException) as err:  # noqa: BLE001  (DCP's CheckpointException is a BaseException)
            msg = f"checkpoint {ckpt} is damaged ({type(err).__name__}: {str(err)[:200]}); trying the previous one"
            warnings.warn(msg, stacklevel=2)
            log(f"warning: {msg}")
            continue
        written_by = int(state.get("world_size", ctx.world))
        if written_by != ctx.world:  # nothing in the update depends on the number of ranks
            log(f"resume: {ctx.world} ranks now, {written_by} wrote the checkpoint; the run continues "
                "exactly as it would have (prompts, noise and optimizer steps do not depend on the ranks)")
        stored = state.get("components") or {k: f(state) for k, f in _LEGACY.items()}
        for name, component in components.items():
            if stored.get(name) is not None:
                component.load_state_dict(stored[name])
        return ckpt, state
    raise ConfigError(f"--resume: no checkpoint under {candidates[0].parent if candidates else 'output_dir'} could "
                      "be loaded")
