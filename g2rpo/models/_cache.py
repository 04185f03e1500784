"""Text embeddings computed once per prompt (the text encoders are frozen during RL)."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["PromptEmbeddingCache"]


class PromptEmbeddingCache:
    """``cache(prompts, encode)``: ``encode([prompt]) -> {name: [1, ...]}`` runs once per prompt not seen
    before (alone, so the result does not depend on the batch); returns ``{name: [len(prompts), ...]}``
    stacked in the prompts' order."""

    def __init__(self) -> None:
        self._rows: dict[str, dict[str, torch.Tensor]] = {}

    def clear(self) -> None:
        """Forget every row (what a prompt is conditioned on changed)."""
        self._rows.clear()

    def __call__(self, prompts: list[str], encode: Callable[[list[str]], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        for p in dict.fromkeys(prompts):
            if p not in self._rows:  # one prompt per call: a prompt's embedding never depends on its batch
                with torch.no_grad():  # (batched text encoders differ in the last bits, which made resumed
                    batch = encode([p])  # runs drift from uninterrupted ones)
                self._rows[p] = {k: v[0].detach() for k, v in batch.items()}
        keys = self._rows[prompts[0]].keys()
        return {k: torch.stack([self._rows[p][k] for p in prompts]) for k in keys}
