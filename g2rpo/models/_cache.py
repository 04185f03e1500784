"""Text embeddings computed once per prompt (the text encoders are frozen during RL)."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["PromptEmbeddingCache"]


class PromptEmbeddingCache:
    """``cache(prompts, encode)``: ``encode(new_prompts) -> {name: [n, ...]}`` runs only for prompts
    not seen before; returns ``{name: [len(prompts), ...]}`` stacked in the prompts' order."""

    def __init__(self) -> None:
        self._rows: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, prompts: list[str], encode: Callable[[list[str]], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._rows]
        if missing:
            with torch.no_grad():
                batch = encode(missing)
            for i, p in enumerate(missing):
                self._rows[p] = {k: v[i].detach() for k, v in batch.items()}
        keys = self._rows[prompts[0]].keys()
        return {k: torch.stack([self._rows[p][k] for p in prompts]) for k in keys}
