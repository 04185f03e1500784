"""Rollout plans: the tree of latent states one prompt's rollout visits.

A plan is built once per strategy (and iteration, for MixGRPO's moving window) and is
the same for every prompt. Each node is a latent state at a grid index; an edge from a
parent is an ODE step (any span) or an SDE step (one grid step, fresh noise). Paths with
the same steps are merged, so a state is computed once however many outputs need it:
that is what makes the shared ODE prefix, the shared v_k and the shared first two
continuation points of every granularity free.

Execution is tick-synchronous: tick ``d`` evaluates the velocity of every non-leaf node
at depth ``d`` (one row each, for every prompt) and creates depth ``d + 1``. The number
of forward rows per prompt is the number of non-leaf nodes (a leaf sits at index T).

Nodes carry *captures*: which output slot they fill (anchor step, SDE source state,
SDE transition, final latent). A node can fill several final slots (two granularity
grids can coincide near the end of the schedule).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ODE", "SDE", "ROOT", "Plan", "PlanBuilder", "TickPlan"]

ROOT, ODE, SDE = 0, 1, 2


@dataclass
class PlanBuilder:
    """Incrementally builds a plan tree, merging identical ODE edges."""

    num_steps: int
    parent: list[int] = field(default_factory=list)
    index: list[int] = field(default_factory=list)
    kind: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    roots: list[int] = field(default_factory=list)
    _ode_children: dict[tuple[int, int], int] = field(default_factory=dict)
    anchor: dict[int, int] = field(default_factory=dict)  # anchor slot t -> node
    sources: list[int] = field(default_factory=list)  # source slot -> node
    transitions: dict[tuple[int, int], int] = field(default_factory=dict)  # (k, g) -> node
    finals: dict[tuple[int, int, int], int] = field(default_factory=dict)  # (k, j, g) -> node

    def _add(self, parent: int, index: int, kind: int) -> int:
        if not 0 <= index <= self.num_steps:
            raise ValueError(f"grid index {index} outside 0..{self.num_steps}")
        self.parent.append(parent)
        self.index.append(index)
        self.kind.append(kind)
        self.depth.append(0 if parent < 0 else self.depth[parent] + 1)
        return len(self.parent) - 1

    def root(self) -> int:
        """A new root at grid index 0 fed by the prompt's initial noise (root slot = order of creation)."""
        node = self._add(-1, 0, ROOT)
        self.roots.append(node)
        return node

    def ode(self, parent: int, to_index: int) -> int:
        """The ODE step from ``parent`` to ``to_index`` (merged with an identical existing one)."""
        if to_index <= self.index[parent]:
            raise ValueError(f"ODE step must move forward: {self.index[parent]} -> {to_index}")
        key = (parent, to_index)
        if key not in self._ode_children:
            self._ode_children[key] = self._add(parent, to_index, ODE)
        return self._ode_children[key]

    def sde(self, parent: int) -> int:
        """A new SDE branch one grid step after ``parent`` (never merged: fresh noise)."""
        return self._add(parent, self.index[parent] + 1, SDE)

    def ode_path(self, start: int, grid: list[int]) -> int:
        """Follow ``grid`` (grid[0] must be start's index) with ODE steps; return the last node."""
        if grid[0] != self.index[start]:
            raise ValueError(f"grid starts at {grid[0]}, node is at {self.index[start]}")
        node = start
        for to_index in grid[1:]:
            node = self.ode(node, to_index)
        return node

    def source_slot(self, node: int) -> int:
        """The SDE source slot of ``node`` (created on first use)."""
        if node not in self.sources:
            self.sources.append(node)
        return self.sources.index(node)

    def build(self, num_k: int, num_j: int, group_size: int, adv_slot_of: list[int], step_index: list[int]) -> Plan:
        """Freeze into a :class:`Plan` with outputs ``[K transitions, J, G]``."""
        return Plan.from_builder(self, num_k, num_j, group_size, adv_slot_of, step_index)


@dataclass(frozen=True)
class TickPlan:
    """What one tick does, as index tensors (positions are per prompt).

    ``frontier`` nodes (non-leaf, depth d) are evaluated; their children (depth d + 1) are
    made from ``child_parent`` positions in the frontier; ``child_keep`` are the children
    that form the next frontier (non-leaves).
    """

    frontier_index: torch.Tensor  # [F] grid index of frontier nodes
    child_parent: torch.Tensor  # [C] position in frontier
    child_index: torch.Tensor  # [C] grid index of child
    ode_pos: torch.Tensor  # [Co] children made by ODE steps
    sde_pos: torch.Tensor  # [Cs] children made by SDE steps
    sde_slot: torch.Tensor  # [Cs] their flat (k, g) transition slot
    child_keep: torch.Tensor  # [F'] children that are non-leaves
    source_capture: tuple[torch.Tensor, torch.Tensor]  # (frontier pos, source slot)
    anchor_capture: tuple[torch.Tensor, torch.Tensor]  # (child pos, anchor slot)
    final_capture: tuple[torch.Tensor, torch.Tensor]  # (child pos, flat (k, j, g) slot)


def _pairs(pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    if not pairs:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    pos, slot = zip(*pairs)
    return torch.tensor(pos, dtype=torch.long), torch.tensor(slot, dtype=torch.long)


@dataclass(frozen=True)
class Plan:
    """A frozen rollout plan for one prompt (replicated over prompts by the engine)."""

    num_steps: int
    num_roots: int
    num_nodes: int
    forward_rows: int  # per prompt: non-leaf nodes
    root_nodes: tuple[int, ...]
    root_capture: tuple[tuple[int, int], ...]  # (root slot, anchor slot) for roots that are anchors
    ticks: tuple[TickPlan, ...]
    num_anchor: int  # T + 1 when the plan has an anchor trajectory, else 0
    num_sources: int
    num_k: int
    num_j: int
    group_size: int
    source_of: torch.Tensor  # [K, G] source slot of each transition
    step_index: torch.Tensor  # [K] grid index of the SDE step of each transition slot
    adv_slot_of: torch.Tensor  # [K] which advantage slot k' (of finals' K axis) scores it
    num_final_k: int

    @staticmethod
    def from_builder(b: PlanBuilder, num_k: int, num_j: int, group_size: int,
                     adv_slot_of: list[int], step_index: list[int]) -> Plan:
        n = len(b.parent)
        T = b.num_steps
        num_final_k = 1 + max(k for k, _, _ in b.finals)
        expected_finals = num_final_k * num_j * group_size
        if len(b.finals) != expected_finals:
            raise ValueError(f"plan fills {len(b.finals)} of {expected_finals} final slots")
        if len(b.transitions) != num_k * group_size:
            raise ValueError(f"plan fills {len(b.transitions)} of {num_k * group_size} transition slots")
        leaf = [b.index[i] == T for i in range(n)]
        anchor_of: dict[int, list[int]] = {}
        for t, node in b.anchor.items():
            anchor_of.setdefault(node, []).append(t)
        finals_of: dict[int, list[int]] = {}
        for (k, j, g), node in b.finals.items():
            finals_of.setdefault(node, []).append((k * num_j + j) * group_size + g)
        trans_of = {node: k * group_size + g for (k, g), node in b.transitions.items()}
        source_of_node = {node: s for s, node in enumerate(b.sources)}
        if sorted(trans_of) != [i for i in range(n) if b.kind[i] == SDE]:
            raise ValueError("every SDE step of a plan must be a transition slot, and only SDE steps")
        for node in b.sources:
            if leaf[node]:
                raise ValueError("an SDE source cannot be a final latent")

        children: dict[int, list[int]] = {}
        for i in range(n):
            if b.parent[i] >= 0:
                children.setdefault(b.parent[i], []).append(i)
        frontier = [r for r in b.roots if not leaf[r]]
        ticks = []
        while frontier:
            pos_of = {node: p for p, node in enumerate(frontier)}
            kids = [c for node in frontier for c in children.get(node, [])]
            ticks.append(TickPlan(
                frontier_index=torch.tensor([b.index[x] for x in frontier], dtype=torch.long),
                child_parent=torch.tensor([pos_of[b.parent[c]] for c in kids], dtype=torch.long),
                child_index=torch.tensor([b.index[c] for c in kids], dtype=torch.long),
                ode_pos=torch.tensor([p for p, c in enumerate(kids) if b.kind[c] == ODE], dtype=torch.long),
                sde_pos=torch.tensor([p for p, c in enumerate(kids) if b.kind[c] == SDE], dtype=torch.long),
                sde_slot=torch.tensor([trans_of[c] for c in kids if b.kind[c] == SDE], dtype=torch.long),
                child_keep=torch.tensor([p for p, c in enumerate(kids) if not leaf[c]], dtype=torch.long),
                source_capture=_pairs([(p, source_of_node[x]) for p, x in enumerate(frontier) if x in source_of_node]),
                anchor_capture=_pairs([(p, t) for p, c in enumerate(kids) for t in anchor_of.get(c, [])]),
                final_capture=_pairs([(p, s) for p, c in enumerate(kids) for s in finals_of.get(c, [])]),
            ))
            frontier = [c for c in kids if not leaf[c]]
        if any(node in finals_of for node in b.roots):
            raise ValueError("a root cannot be a final latent")
        source_of = torch.full((num_k, group_size), -1, dtype=torch.long)
        for (k, g), node in b.transitions.items():
            source_of[k, g] = source_of_node[b.parent[node]]
        return Plan(
            num_steps=T,
            num_roots=len(b.roots),
            num_nodes=n,
            forward_rows=sum(not leaf[i] for i in range(n)),
            root_nodes=tuple(b.roots),
            root_capture=tuple((r, t) for r, node in enumerate(b.roots) for t in anchor_of.get(node, [])),
            ticks=tuple(ticks),
            num_anchor=(T + 1) if b.anchor else 0,
            num_sources=len(b.sources),
            num_k=num_k,
            num_j=num_j,
            group_size=group_size,
            source_of=source_of,
            step_index=torch.tensor(step_index, dtype=torch.long),
            adv_slot_of=torch.tensor(adv_slot_of, dtype=torch.long),
            num_final_k=num_final_k,
        )
