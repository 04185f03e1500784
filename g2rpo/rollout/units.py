"""Training units: the transitions one set of forwards scores (a scoring concept: :mod:`.scoring` scores them,
the trainer's work list is made of them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TrainingUnit", "training_units"]


@dataclass
class TrainingUnit:
    """Transitions scored by one set of forwards: slot ``slot`` of prompts ``rows``, the branches that
    ``mask [Pc, G]`` selects (None: all). :func:`training_units` yields one per (prompt, slot,
    source state), with the source state ``x``, the transitions ``x_next`` leaving it and their
    ``old_log_probs``; their advantages are ``adv[prompt, adv_slot, branches]`` of the ``[P, K', G]``
    advantages (:func:`g2rpo.integrate_advantages`). A trainer's work list (:func:`work_units`)
    holds units of several prompts."""

    slot: int  # k: the row of Rollout.x_next / log_probs' K axis
    rows: slice  # the prompts
    mask: torch.Tensor | None = None  # [Pc, G] the branches scored; None: all
    step_index: int = -1  # the grid index e of the SDE step (units of training_units())
    adv_slot: int = -1
    source: int = -1  # the row of Rollout.x_k[prompt]
    x: torch.Tensor | None = None  # the source state [...]
    x_next: torch.Tensor | None = None  # [n, ...]
    old_log_probs: torch.Tensor | None = None  # [n]

    @property
    def prompt(self) -> int:
        if self.rows.stop - self.rows.start != 1:
            raise ValueError(f"unit of prompts {self.rows.start}..{self.rows.stop - 1} has no single prompt")
        return self.rows.start

    @property
    def branches(self) -> torch.Tensor:
        """The group members ``g`` of a one-prompt unit."""
        if self.mask is None:
            raise ValueError("this unit scores every branch: its branches are range(G)")
        return self.mask[0].nonzero().flatten()

    @property
    def empty(self) -> bool:
        """Trains nothing on this rank (run for its collectives only)."""
        return self.mask is not None and not bool(self.mask.any())

    def selection(self, num_branches: int) -> torch.Tensor:
        """The ``[Pc, G]`` mask of the transitions the unit scores."""
        if self.mask is not None:
            return self.mask
        return torch.ones(self.rows.stop - self.rows.start, num_branches, dtype=torch.bool)

    def everything(self) -> TrainingUnit:
        """The same slot and prompts with every branch (what an empty unit's forward runs)."""
        return TrainingUnit(self.slot, self.rows)


def training_units(rollout):
    """What a trainer needs, for any strategy: one :class:`TrainingUnit` per (prompt, transition slot,
    source state), holding the source state, the transitions leaving it, their old log-probs and the
    advantage slot. One forward at ``unit.x`` scores every transition of the unit
    (:func:`g2rpo.pipelines.unit_log_probs`); for G2RPO a unit is the whole group at one ``x_k``."""
    P, K, G = rollout.log_probs.shape
    for p in range(P):
        for k in range(K):
            for s in torch.unique(rollout.source_of[k]).tolist():
                chosen = rollout.source_of[k] == s
                g = chosen.nonzero().flatten()
                yield TrainingUnit(slot=k, rows=slice(p, p + 1), mask=chosen[None].clone(),
                                   step_index=int(rollout.step_index[k]), adv_slot=int(rollout.adv_slot_of[k]),
                                   source=s, x=rollout.x_k[p, s],
                                   x_next=rollout.x_next[p, k, g.to(rollout.x_next.device)],
                                   old_log_probs=rollout.log_probs[p, k, g.to(rollout.log_probs.device)])
