"""The sampler every strategy rolls out through: plans from the strategy, batched rows through the engine."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from .engine import Rollout, RolloutEngine, VelocityModel
from .plan import Plan
from .strategies import Strategy, make_strategy
from .strategies import strategy_options as strategy_options_for

__all__ = ["RolloutSampler", "G2RPOSampler"]


class RolloutSampler:
    """Roll out a group per prompt with any strategy; G2RPO by default.

    ``model(x [B, ...], sigma [B], cond) -> velocity [B, ...]`` with per-row sigmas (see
    :mod:`g2rpo.rollout.engine` for how ``cond`` is gathered per row). ``sde_indices``
    and ``granularities`` apply to the G2RPO strategies; other strategy options
    (``window_size``, ``train_fraction``, ``shared_noise``, ...) go in ``strategy_options``.
    ``eta``, ``sde_indices`` and ``granularities`` left None take the strategy's own defaults (its dataclass:
    eta 0.7, DanceGRPO 0.3; M = the first 8 steps; Lambda = {1, 2, 3}).
    ``sigmas`` (``[T + 1]``, e.g. a pipeline's own default schedule:
    :meth:`~g2rpo.models.base.PolicyAdapter.pipeline_sigmas`) replaces the static ``shift`` schedule.
    ``step_noise_dtype``: the dtype SDE-step noise is drawn in (bf16 as the public G2RPO / MixGRPO steps). ``ops_backend``
    picks the fused SDE step (:mod:`g2rpo.ops`; ``"torch"`` is the reference). ``cuda_graphs``
    (GPU) or ``compile_options`` (torch.compile kwargs, any device) compile the model, with chunks
    padded to ``batch_buckets`` row counts (at most 4 shapes by default). ``strategy`` may
    also be a built :class:`Strategy`; its own settings are then used as they are.
    """

    def __init__(self, model: VelocityModel, num_steps: int = 16, shift: float = 3.0, eta: float | None = None,
                 sde_indices: Iterable[int] | None = None, granularities: Iterable[int] | None = None,
                 group_size: int = 12, max_batch: int | None = 64, strategy: str | Strategy = "g2rpo",
                 quantize_timesteps: bool = False, check_finite: bool = True, ops_backend: str = "auto",
                 cuda_graphs: bool = False, compile_options: dict | None = None,
                 batch_buckets: Iterable[int] | None = None, schedule_precision: str = "float64",
                 sigmas: torch.Tensor | Sequence[float] | None = None, step_noise_dtype: torch.dtype = torch.float32,
                 **strategy_options) -> None:
        if isinstance(strategy, Strategy):
            given = dict(strategy_options, eta=eta, sde_indices=sde_indices, granularities=granularities)
            given = sorted(k for k, v in given.items() if v is not None)
            if given:
                raise ValueError(f"options {given} given with a built strategy (it carries its own)")
            self.strategy = strategy
        else:
            self.strategy = make_strategy(strategy, **strategy_options_for(
                strategy, num_steps=num_steps, group_size=group_size, eta=eta, sde_indices=sde_indices,
                granularities=granularities, **strategy_options))
        self.engine = RolloutEngine(model, self.strategy.num_steps, shift=shift, max_batch=max_batch,
                                    quantize_timesteps=quantize_timesteps, check_finite=check_finite,
                                    ops_backend=ops_backend, cuda_graphs=cuda_graphs, compile_options=compile_options,
                                    batch_buckets=batch_buckets, schedule_precision=schedule_precision, sigmas=sigmas)
        self.engine.step_noise_dtype = step_noise_dtype
        self._plans: dict[tuple, Plan] = {}

    @property
    def sigmas(self) -> torch.Tensor:
        return self.engine.sigmas

    def set_strategy(self, strategy: Strategy) -> None:
        """Roll out with another strategy from now on (same number of steps): the plans are rebuilt."""
        if strategy.num_steps != self.strategy.num_steps:
            raise ValueError(f"the new strategy has {strategy.num_steps} steps, the engine {self.strategy.num_steps}")
        self.strategy = strategy
        self._plans.clear()

    def plan(self, iteration: int = 0) -> Plan:
        """The (cached) plan of this iteration."""
        s = self.strategy
        key = tuple(s.sde_steps(iteration))
        if key not in self._plans:
            self._plans[key] = s.plan(iteration)
        return self._plans[key]

    def initial_noise(self, num_prompts: int, latent_shape: tuple[int, ...], generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
        """Initial noise in the shape :meth:`rollout` expects: ``[P, ...]`` or ``[P, R, ...]``."""
        roots = self.plan().num_roots
        shape = (num_prompts, *latent_shape) if roots == 1 else (num_prompts, roots, *latent_shape)
        return torch.randn(shape, generator=generator, device=device)

    def per_prompt_noise(self, prepare_latents: Callable[..., torch.Tensor], generators: Sequence[torch.Generator],
                         device: torch.device | str | None = None, iteration: int = 0) -> torch.Tensor:
        """Initial noise ``[P, ...]`` (``[P, R, ...]`` for a strategy with R roots): prompt p's from its own
        generator through ``prepare_latents(n, generator, device=...)`` (the policy's, as its pipeline draws
        noise), so that a prompt's noise depends on nothing else in the batch."""
        roots = self.plan(iteration).num_roots
        draws = [prepare_latents(roots, g, device=device) for g in generators]
        return torch.stack([z[0] if roots == 1 else z for z in draws])

    @torch.no_grad()
    def rollout(self, noise: torch.Tensor, cond: object = None,
                generator: torch.Generator | list[torch.Generator] | None = None, iteration: int = 0) -> Rollout:
        """Sample the groups of P prompts from ``noise [P, ...]`` (one shared noise per prompt).

        ``generator`` draws the SDE noise: one for all prompts, or a list of P (one per
        prompt: a prompt's rollout is then independent of the other prompts in the call).
        """
        s = self.strategy
        plan = self.plan(iteration)
        out = self.engine.run(plan, noise, cond, s.eta, s.sde_kind, generator)
        return Rollout(
            strategy=s.name, sigmas=self.sigmas, eta=float(s.eta), sde_kind=s.sde_kind,
            source_of=plan.source_of, step_index=plan.step_index, adv_slot_of=plan.adv_slot_of,
            sde_indices=tuple(plan.step_index.tolist()),
            granularities=s.continuation_granularities(), **out,
        )


#: The name it had when it ran G2RPO alone (it runs every strategy): kept for code written against it.
G2RPOSampler = RolloutSampler
