"""Prompt files: ``.txt`` (one prompt per line), ``.jsonl`` / ``.json`` (HPSv2 style: strings or
objects with a ``prompt`` or ``caption`` field), or ``builtin:lab`` / ``builtin:lab_test``.

:class:`PromptSchedule` gives every iteration its global prompt list: the dataset is
reshuffled each epoch with the training seed, so iteration ``i`` always sees the same
prompts whatever the number of ranks, and resuming needs only ``i``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["BUILTIN_PROMPTS", "builtin_prompt_path", "load_prompts", "PromptSchedule"]

#: The built-in prompt sets (``builtin:NAME``): text files shipped in ``g2rpo/data/prompts/``.
BUILTIN_PROMPTS = Path(__file__).resolve().parent / "data" / "prompts"


def builtin_prompt_path(name: str) -> Path:
    """The file of built-in prompt set ``name``; ValueError lists the sets."""
    path = BUILTIN_PROMPTS / f"{name}.txt"
    if not name or "/" in name or not path.is_file():
        known = ", ".join(f"builtin:{p.stem}" for p in sorted(BUILTIN_PROMPTS.glob("*.txt")))
        raise ValueError(f"unknown built-in prompt set 'builtin:{name}': use {known}")
    return path


def _from_item(item: object, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in ("prompt", "caption", "text"):
            if isinstance(item.get(key), str):
                return item[key]
    raise ValueError(f"{where}: expected a string or an object with a 'prompt'/'caption' field, got {item!r}")


def load_prompts(spec: str) -> list[str]:
    """Read prompts from a file or a ``builtin:`` name; a missing or empty source raises."""
    if spec.startswith("builtin:"):
        path = builtin_prompt_path(spec.split(":", 1)[1])
    else:
        path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        prompts = [_from_item(json.loads(line), f"{path}:{i + 1}") for i, line in enumerate(text.splitlines())
                   if line.strip()]
    elif path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json prompt file must hold a list")
        prompts = [_from_item(item, f"{path}[{i}]") for i, item in enumerate(data)]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


class PromptSchedule:
    """Deterministic global prompt order: epoch ``e`` is a permutation seeded by ``(seed, e)``."""

    def __init__(self, prompts: list[str], seed: int, shuffle: bool = True) -> None:
        self.prompts, self.seed, self.shuffle = prompts, seed, shuffle
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            n = len(self.prompts)
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(n) if self.shuffle else np.arange(n)
        return self._perms[epoch]

    def indices(self, iteration: int, per_iteration: int) -> list[int]:
        """Global positions ``iteration * n .. (iteration + 1) * n - 1`` of the stream."""
        return list(range(iteration * per_iteration, (iteration + 1) * per_iteration))

    def prompt_at(self, position: int) -> str:
        n = len(self.prompts)
        return self.prompts[int(self._perm(position // n)[position % n])]
