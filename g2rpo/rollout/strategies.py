"""Rollout strategies as plan builders over one engine.

* ``g2rpo`` — Singular Stochastic Sampling (Sec. 4.1) + Multi-Granularity continuation
  (Sec. 4.2): one anchor ODE trajectory per prompt; at each grid index ``e`` in M one
  SDE step from the shared ``x_e`` makes G branches; each branch is finished by the ODE
  on :func:`granularity_grid` for every lambda in Lambda.
* ``g2rpo_no_mgai`` — the same with Lambda = {1}.
* ``dance_grpo`` — SDE at every step (DanceGRPO's constant-diffusion kind, eta 0.3),
  same initial noise in the group, the final reward broadcast to every step, a random
  fraction (0.6) of the steps trained per iteration.
* ``flow_grpo`` — SDE at every step (Flow-GRPO kind, eta 0.7), independent initial
  noise per group member, every step trained.
* ``mix_grpo`` — SDE only inside a window of ``window_size`` steps, ODE elsewhere; the
  window starts at 0 and moves by ``window_stride`` every ``shift_interval`` iterations
  up to ``window_max_start`` (MixGRPO's progressive sliding window); window steps trained.

Every strategy's plan yields transitions ``[K, G]`` (K trained-step slots) whose
advantage comes from ``finals[:, adv_slot_of[k], :, g]`` (K' x J x G final latents).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..schedule import granularity_grid
from ..sde import SDE_KINDS
from .plan import Plan, PlanBuilder

#: The largest plan (states per prompt, an upper bound) a strategy builds: far above any GRPO setting, far below
#: what would spend minutes building before an allocator error.
MAX_PLAN_STATES = 2_000_000

__all__ = ["MAX_PLAN_STATES", "Strategy", "G2RPOStrategy", "TrajectoryStrategy", "STRATEGIES", "STRATEGY_CLASSES", "TRAIN_SELECTIONS",
           "make_strategy", "strategy_options"]

TRAIN_SELECTIONS = ("per_iteration", "per_sample", "first")


@dataclass(frozen=True)
class Strategy:
    """Common settings; subclasses build the plan."""

    num_steps: int = 16
    group_size: int = 12
    eta: float = 0.7
    sde_kind: str = "flow_grpo"
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {self.num_steps!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"group_size must be an int >= 2 (advantages are standardised in the group), "
                             f"got {self.group_size!r}")
        if not (isinstance(self.eta, (int, float)) and self.eta > 0):
            raise ValueError(f"eta must be > 0 for a stochastic rollout, got {self.eta!r}")
        if self.sde_kind not in SDE_KINDS:
            raise ValueError(f"sde_kind must be one of {SDE_KINDS}, got {self.sde_kind!r}")
        nodes = self.group_size * self.num_steps * self.num_steps  # an upper bound of the plan's states per prompt
        if nodes > MAX_PLAN_STATES:
            raise ValueError(f"group_size {self.group_size} x num_steps {self.num_steps}: a plan of up to {nodes:,} "
                             f"states per prompt is over the {MAX_PLAN_STATES:,} g2rpo builds (GRPO groups are 4-64)")

    def plan(self, iteration: int = 0) -> Plan:  # pragma: no cover - abstract
        raise NotImplementedError

    def sde_steps(self, iteration: int = 0) -> list[int]:
        """Grid indices with an SDE step at this iteration (every step unless the strategy says otherwise)."""
        return list(range(self.num_steps))

    def candidate_sde_steps(self) -> list[int]:
        """Every grid index any iteration may take an SDE step at (what the config checks eta against)."""
        return list(range(self.num_steps))

    def continuation_granularities(self) -> tuple[int, ...]:
        """Lambda: the granularities a branch is finished at (one, the full grid, unless the strategy has more)."""
        return (1,)

    def with_granularities(self, granularities: tuple[int, ...]) -> Strategy:
        """The same strategy finishing its branches at ``granularities`` (a multi-granularity strategy only)."""
        if tuple(granularities) != self.continuation_granularities():
            raise ValueError(f"strategy {self.name!r} finishes its branches at {self.continuation_granularities()}; "
                             f"it cannot take granularities {tuple(granularities)}")
        return self

    def train_mask(self, plan: Plan, num_prompts: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Which transitions ``[P, K, G]`` (prompt, trained-step slot, branch) are trained this
        iteration: all by default."""
        return torch.ones(num_prompts, plan.num_k, plan.group_size, dtype=torch.bool)

    @classmethod
    def config_problems(cls, name: str, sampler: Any, options: dict[str, Any]) -> list[str]:
        """What is wrong with a ``sampler`` config (:class:`g2rpo.config.SamplerConfig`) for this strategy, one
        ``"key message"`` each, before it is built from ``options`` (:func:`strategy_options`): G2RPO's options
        on a strategy without SDE candidates."""
        out = []
        for key, what in (("sde_subset", "a subset of sde_indices"), ("chain_sources", "chained SDE sources")):
            if getattr(sampler, key) not in (None, False):
                out.append(f"sampler.{key} is a G2RPO option ({what}); strategy {name!r} has no sde_indices")
        if sampler.auto_granularity_threshold is not None:
            out.append(f"sampler.auto_granularity_threshold drops granularities of a G2RPO plan with several; "
                       f"strategy {name!r} finishes its branches at one")
        return out

    def check_schedule(self, sigmas: torch.Tensor) -> None:
        """ValueError when eta is so large that an SDE step's mean coefficient ``a`` (x_next = a x + b v + ...)
        is <= 0 on the schedule ``sigmas`` (``[T + 1]``) at a grid index any iteration may take."""
        from ..sde import sde_coefficients

        steps = self.candidate_sde_steps()
        a, _, _ = sde_coefficients(sigmas, torch.tensor(steps), float(self.eta), self.sde_kind)
        if (a <= 0).any():
            i = int(torch.argmin(a))
            a1, _, _ = sde_coefficients(sigmas, torch.tensor(steps), 1.0, self.sde_kind)
            eta_max = float(torch.sqrt(1.0 / (1.0 - a1).clamp_min(1e-12)).min())  # a = 1 - eta^2 (1 - a(eta=1))
            raise ValueError(f"sampler.eta={self.eta:g} is too large: the SDE step at grid index {steps[i]} "
                             f"(sigma {float(sigmas[steps[i]]):.4f}) would scale x by {float(a[i]):.3g} <= 0; "
                             f"eta must be < {eta_max:.3f} here (the public code uses 0.3-0.7)")


@dataclass(frozen=True)
class G2RPOStrategy(Strategy):
    """G2RPO: singular SDE step at each e in ``sde_indices``, multi-granularity ODE continuation."""

    sde_indices: tuple[int, ...] = tuple(range(8))
    granularities: tuple[int, ...] = (1, 2, 3)
    # a cheaper G2RPO (issue 21): each iteration rolls out a random subset of this many of the sde_indices, drawn
    # from (subset_seed, iteration), so every rank and a resumed run draw the same; None: all of them (G2RPO)
    sde_subset: int | None = None
    subset_seed: int = 0
    # shared continuations across k (issue 21, BranchGRPO's shared prefixes): each later SDE step branches from the
    # state its predecessor's first branch reaches on its finest continuation, instead of from a separate anchor ODE
    # trajectory; the states on that path are computed once for both. False: the anchor trajectory (G2RPO)
    chain_sources: bool = False

    @classmethod
    def config_problems(cls, name: str, sampler: Any, options: dict[str, Any]) -> list[str]:
        """The range of M and Lambda against ``sampler.num_steps``, and auto granularity's need for several."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        sde_indices = list(options.get("sde_indices", defaults["sde_indices"]))
        granularities = [1] if name == "g2rpo_no_mgai" else list(options.get("granularities",
                                                                             defaults["granularities"]))
        T, out = sampler.num_steps, []
        if not all(0 <= e < T for e in sde_indices):
            out.append(f"sampler.sde_indices must be in 0..sampler.num_steps-1 = 0..{T - 1}, got {sde_indices}"
                       + ("" if sampler.sde_indices is not None else f" (the {name} default: set sampler.sde_indices)"))
        if not granularities or not all(isinstance(g, int) and g >= 1 for g in granularities):
            out.append("sampler.granularities must be a non-empty list of ints >= 1")
        elif not all(g < T for g in granularities):
            out.append(f"sampler.granularities must be < sampler.num_steps ({T}): a granularity is a stride over the "
                       f"remaining steps, got {granularities}")
        if sampler.auto_granularity_threshold is not None and len(granularities) < 2:
            out.append(f"sampler.auto_granularity_threshold drops granularities of a G2RPO plan with several; "
                       f"strategy {name!r} with granularities {granularities} has none to drop")
        return out

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "sde_indices", tuple(int(e) for e in self.sde_indices))
        object.__setattr__(self, "granularities", tuple(int(g) for g in self.granularities))
        if not self.sde_indices:
            raise ValueError("sde_indices must not be empty")
        bad = [e for e in self.sde_indices if not 0 <= e < self.num_steps]
        if bad:
            raise ValueError(f"sde_indices must be in 0..{self.num_steps - 1}, got {bad}")
        if len(set(self.sde_indices)) != len(self.sde_indices):
            raise ValueError(f"sde_indices must be distinct, got {list(self.sde_indices)}")
        if not self.granularities:
            raise ValueError("granularities must not be empty")
        if any(g < 1 for g in self.granularities) or len(set(self.granularities)) != len(self.granularities):
            raise ValueError(f"granularities must be distinct ints >= 1, got {list(self.granularities)}")
        if self.sde_subset is not None and (isinstance(self.sde_subset, bool) or not isinstance(self.sde_subset, int)
                                            or not 1 <= self.sde_subset <= len(self.sde_indices)):
            raise ValueError(f"sde_subset must be an int in 1..{len(self.sde_indices)} (the number of sde_indices) or "
                             f"None, got {self.sde_subset!r}")
        for e in self.sde_indices:  # two granularities with one continuation would count its rewards twice
            grids: dict[tuple[int, ...], int] = {}
            for lam in self.granularities:
                g = tuple(granularity_grid(self.num_steps, e, lam))
                if g in grids:
                    raise ValueError(f"granularities {grids[g]} and {lam} give the same ODE continuation {list(g)} "
                                     f"after the SDE step at {e} (num_steps {self.num_steps}): the same rewards would "
                                     "be counted twice; drop one granularity or that SDE index")
                grids[g] = lam

    def plan(self, iteration: int = 0) -> Plan:
        T, G = self.num_steps, self.group_size
        b = PlanBuilder(T)
        steps = self.sde_steps(iteration)
        node = b.root()
        if self.chain_sources:  # the ODE from the noise to the first SDE step only; later sources are chained
            source = b.ode_path(node, list(range(steps[0] + 1)))
        else:  # the anchor ODE trajectory (its final latent is the rollout's `anchor`)
            b.anchor[0] = node
            anchor = [node]
            for t in range(1, T + 1):
                node = b.ode(node, t)
                b.anchor[t] = node
                anchor.append(node)
        for k, e in enumerate(steps):
            if not self.chain_sources:
                source = anchor[e]
            b.source_slot(source)
            first = None
            for g in range(G):
                branch = b.sde(source)
                first = branch if first is None else first
                b.transitions[(k, g)] = branch
                for j, lam in enumerate(self.granularities):
                    b.finals[(k, j, g)] = b.ode_path(branch, granularity_grid(T, e, lam))
            if self.chain_sources and k + 1 < len(steps):
                source = b.ode_path(first, self.chain_path(e, steps[k + 1]))
        K = len(steps)
        return b.build(K, len(self.granularities), G, adv_slot_of=list(range(K)), step_index=steps)

    def chain_path(self, e: int, e_next: int) -> list[int]:
        """``chain_sources``: the grid indices from the branch at ``e + 1`` to the next SDE step ``e_next``, on
        the first granularity's continuation grid (shared with it), then one step to ``e_next`` if it is off it."""
        path = [i for i in granularity_grid(self.num_steps, e, self.granularities[0]) if i <= e_next]
        return path if path[-1] == e_next else path + [e_next]

    def candidate_sde_steps(self) -> list[int]:
        return list(self.sde_indices)

    def continuation_granularities(self) -> tuple[int, ...]:
        return tuple(self.granularities)

    def with_granularities(self, granularities: tuple[int, ...]) -> Strategy:
        return dataclasses.replace(self, granularities=tuple(granularities))

    def sde_steps(self, iteration: int = 0) -> list[int]:
        """The SDE steps rolled out at this iteration: all of ``sde_indices``, or with ``sde_subset`` a sorted
        random subset drawn from ``(subset_seed, iteration)`` alone (the same on every rank and after a resume)."""
        if self.sde_subset is None or self.sde_subset >= len(self.sde_indices):
            return list(self.sde_indices)
        rng = np.random.default_rng([int(self.subset_seed), int(iteration)])
        picked = rng.choice(len(self.sde_indices), size=self.sde_subset, replace=False)
        return sorted(self.sde_indices[i] for i in picked)


@dataclass(frozen=True)
class TrajectoryStrategy(Strategy):
    """DanceGRPO / Flow-GRPO / MixGRPO: G full trajectories with SDE steps at a set of indices."""

    shared_noise: bool = True
    train_fraction: float = 1.0
    # which int(train_fraction * eligible) steps are trained: one random subset of the slots for the
    # whole iteration ("per_iteration"), a random subset per sample ("per_sample", DanceGRPO's code),
    # or the first ones in order ("first", Flow-GRPO's code)
    train_selection: str = "per_iteration"
    # False: the last grid step is never trained (DanceGRPO's code); None: not when score_x0 (the last step's noise
    # never reaches the x0-scored image, so its policy gradient is zero-mean noise), else yes
    train_last_step: bool | None = None
    window_size: int | None = None  # None: SDE at every step
    window_stride: int = 1
    shift_interval: int = 25
    window_max_start: int | None = None  # the window start is clipped here (and to T - window_size)
    # MixGRPO's code: the window covers range(start, min(start + size, window_end)) (window_end T-2;
    # a negative value counts from T),
    # and with window_roll_back the start goes back to 0 once it passes window_end
    window_end: int | None = None
    window_roll_back: bool = False
    # the image scored: False, the trajectory's last sample; True, the last step's x0 prediction x - sigma v
    # (DanceGRPO's run_sample_step scores pred_original of its last flux_step, so the last step's noise never
    # reaches the reward). With sigma_T = 0 that is the last step's Euler ODE step, from the same forward.
    score_x0: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction!r}")
        if self.train_selection not in TRAIN_SELECTIONS:
            raise ValueError(f"train_selection must be one of {TRAIN_SELECTIONS}, got {self.train_selection!r}")
        if self.train_last_step is None:
            object.__setattr__(self, "train_last_step", not self.score_x0)
        elif self.train_last_step and self.score_x0:
            raise ValueError("train_last_step=True with score_x0=True trains the last step, whose noise never reaches "
                             "the scored x0 prediction (its gradient is zero-mean noise; DanceGRPO's code drops it): "
                             "set train_last_step false, or score_x0 false to score the last sample")
        if self.window_end is not None and self.window_end < 0:  # relative to T: -2 is MixGRPO's T-2
            object.__setattr__(self, "window_end", self.num_steps + self.window_end)
        if self.window_end is not None and not 1 <= self.window_end <= self.num_steps:
            raise ValueError(f"window_end must be in 1..{self.num_steps}, got {self.window_end!r}")
        if self.window_roll_back and self.window_end is None:
            raise ValueError("window_roll_back needs window_end (where the window start rolls back)")
        if self.window_size is not None and not 1 <= self.window_size <= self.num_steps:
            raise ValueError(f"window_size must be in 1..{self.num_steps}, got {self.window_size!r}")
        if self.shift_interval < 1 or self.window_stride < 0:
            raise ValueError("shift_interval must be >= 1 and window_stride >= 0")

    def sde_steps(self, iteration: int = 0) -> list[int]:
        """Grid indices with an SDE step at this iteration."""
        if self.window_size is None:
            return list(range(self.num_steps))
        shifts = iteration // self.shift_interval
        if self.window_end is not None:  # MixGRPO's code: start <= window_end, else roll back to 0 or clip
            if self.window_roll_back and self.window_stride > 0:
                shifts %= self.window_end // self.window_stride + 1
            start = min(shifts * self.window_stride, self.window_end)
            if self.window_max_start is not None:
                start = min(start, self.window_max_start)
            return list(range(start, min(start + self.window_size, self.window_end)))
        max_start = self.num_steps - self.window_size
        if self.window_max_start is not None:
            max_start = min(max_start, self.window_max_start)
        start = min(shifts * self.window_stride, max_start)
        return list(range(start, start + self.window_size))

    def plan(self, iteration: int = 0) -> Plan:
        T, G = self.num_steps, self.group_size
        steps = self.sde_steps(iteration)
        b = PlanBuilder(T)
        shared = b.root() if self.shared_noise else None
        for g in range(G):
            node = shared if shared is not None else b.root()
            for t in range(T):
                if t in steps:
                    b.source_slot(node)
                    child = b.sde(node)
                    b.transitions[(steps.index(t), g)] = child
                    node = b.ode(node, T) if t == T - 1 and self.score_x0 else child
                else:
                    node = b.ode(node, t + 1)
            b.finals[(0, 0, g)] = node
        K = len(steps)
        return b.build(K, 1, G, adv_slot_of=[0] * K, step_index=steps)

    def train_mask(self, plan: Plan, num_prompts: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[P, K, G]``: ``int(train_fraction * eligible)`` (at least 1) of the eligible slots (all, or
        all but the last grid step), chosen per ``train_selection``."""
        P, K, G = num_prompts, plan.num_k, plan.group_size
        eligible = [k for k in range(K) if self.train_last_step or int(plan.step_index[k]) != self.num_steps - 1]
        mask = torch.zeros(P, K, G, dtype=torch.bool)
        if not eligible:
            return mask
        n = max(1, int(self.train_fraction * len(eligible) + 1e-9))
        idx = torch.tensor(eligible)
        if self.train_selection == "first" or n == len(eligible):
            mask[:, idx[:n]] = True
        elif self.train_selection == "per_iteration":
            mask[:, idx[torch.randperm(len(eligible), generator=generator)[:n]]] = True
        else:  # per sample (prompt, branch): its own subset, as DanceGRPO's per-sample permutations
            for p in range(P):
                for g in range(G):
                    mask[p, idx[torch.randperm(len(eligible), generator=generator)[:n]], g] = True
        return mask


def _g2rpo(**kw) -> Strategy:
    return G2RPOStrategy(name="g2rpo", **kw)


def _g2rpo_no_mgai(**kw) -> Strategy:
    if "granularities" in kw and tuple(kw["granularities"]) != (1,):
        raise ValueError("g2rpo_no_mgai uses granularities (1,); use 'g2rpo' for others")
    kw["granularities"] = (1,)
    return G2RPOStrategy(name="g2rpo_no_mgai", **kw)


def _dance(**kw) -> Strategy:
    kw = {"eta": 0.3, "sde_kind": "dance_grpo", "train_fraction": 0.6, "score_x0": True, **kw}
    return TrajectoryStrategy(name="dance_grpo", **kw)


def _flow(**kw) -> Strategy:
    kw = {"eta": 0.7, "sde_kind": "flow_grpo", "shared_noise": False, **kw}
    return TrajectoryStrategy(name="flow_grpo", **kw)


def _mix(**kw) -> Strategy:
    kw = {"eta": 0.7, "sde_kind": "flow_grpo", "window_size": 4, "shift_interval": 25, "window_stride": 1, **kw}
    if kw.get("window_max_start") is None and kw.get("window_end") is None:
        kw["window_max_start"] = kw.get("num_steps", 16) // 2
    return TrajectoryStrategy(name="mix_grpo", **kw)


STRATEGIES = {"g2rpo": _g2rpo, "g2rpo_no_mgai": _g2rpo_no_mgai, "dance_grpo": _dance,
              "flow_grpo": _flow, "mix_grpo": _mix}
#: The class each strategy builds (what options it takes).
STRATEGY_CLASSES = {"g2rpo": G2RPOStrategy, "g2rpo_no_mgai": G2RPOStrategy, "dance_grpo": TrajectoryStrategy,
                    "flow_grpo": TrajectoryStrategy, "mix_grpo": TrajectoryStrategy}


def strategy_options(name: str, *, num_steps: int, group_size: int, eta: float | None = None,
                     sde_indices: Iterable[int] | None = None, granularities: Iterable[int] | None = None,
                     **options: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`make_strategy` for strategy ``name``: the options it takes, those left
    None dropped (the strategy's own default), ``sde_indices`` / ``granularities`` only for the strategies that
    have them (G2RPO's; ``g2rpo_no_mgai`` has the single granularity 1). Shared by the config and the sampler."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    takes = {f.name for f in dataclasses.fields(STRATEGY_CLASSES[name])}
    opts: dict[str, Any] = {"num_steps": num_steps, "group_size": group_size}
    if eta is not None:
        opts["eta"] = eta
    if sde_indices is not None and "sde_indices" in takes:
        opts["sde_indices"] = tuple(sde_indices)
    if granularities is not None and "granularities" in takes and name != "g2rpo_no_mgai":
        opts["granularities"] = tuple(granularities)
    if "sde_subset" not in takes:  # G2RPO's cheaper variants: only G2RPO strategies take them
        for key in ("sde_subset", "subset_seed", "chain_sources"):
            options.pop(key, None)
    opts.update({k: v for k, v in options.items() if v is not None})
    return opts


def make_strategy(name: str, **kwargs) -> Strategy:
    """Build a strategy by name (``g2rpo``, ``g2rpo_no_mgai``, ``dance_grpo``, ``flow_grpo``, ``mix_grpo``)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    try:
        return STRATEGIES[name](**kwargs)
    except TypeError as err:  # an option the strategy does not have
        raise ValueError(f"strategy {name!r}: {err}") from None
