"""The batched rollout engine: executes a :class:`~g2rpo.rollout.plan.Plan` for P prompts.

Each tick evaluates the velocity of every state that is due (all prompts, all branches,
all granularities, all k) in chunks of at most ``max_batch`` rows, whose sigmas may
differ, then makes the next states with :func:`~g2rpo.sde.ode_step` and
:func:`g2rpo.ops.sde_step_logprob` (the fused SDE step). Latents are kept in fp32.

Conditioning: ``cond`` holds one entry per prompt along its leading dim and is gathered
per row with the row's prompt index: a tensor ``[P, ...]`` (``index_select``), a dict of
such values (each gathered), a tuple (each element gathered), a list of P per-prompt
objects (picked by index), or None.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..schedule import check_sigmas, model_timesteps, sigma_schedule
from ..ops import sde_step_logprob
from ..sde import ode_step, sde_coefficients
from .plan import Plan
from .units import training_units

__all__ = ["Rollout", "RolloutEngine", "default_buckets", "gather_cond", "cond_prompt_count"]

VelocityModel = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


def cond_prompt_count(cond: object) -> int | None:
    """Leading (prompt) dim of ``cond``; None when ``cond`` is None. Inconsistent sizes raise."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        if cond.ndim == 0:
            raise ValueError("a cond tensor needs a leading prompt dim")
        return cond.shape[0]
    if isinstance(cond, Mapping) or isinstance(cond, tuple):
        items = cond.items() if isinstance(cond, Mapping) else enumerate(cond)
        counts = {key: cond_prompt_count(v) for key, v in items}
        sizes = {c for c in counts.values() if c is not None}
        if len(sizes) > 1:
            raise ValueError(f"cond entries disagree on the number of prompts: {counts}")
        return sizes.pop() if sizes else None
    if isinstance(cond, list):
        return len(cond)
    raise TypeError(f"unsupported cond type {type(cond).__name__}: use a tensor, dict, tuple, list or None")


def _check_cond(cond: object, prompts: int) -> None:
    n_cond = cond_prompt_count(cond)
    if n_cond is not None and n_cond != prompts:
        raise ValueError(f"noise has {prompts} prompts but cond has {n_cond}")


def gather_cond(cond: object, rows: torch.Tensor) -> object:
    """Pick the conditioning of each row (``rows`` are prompt indices)."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond.index_select(0, rows.to(cond.device))
    if isinstance(cond, Mapping):
        return {k: gather_cond(v, rows) for k, v in cond.items()}
    if isinstance(cond, tuple):
        return tuple(gather_cond(v, rows) for v in cond)
    if isinstance(cond, list):
        return [cond[i] for i in rows.tolist()]
    raise TypeError(f"unsupported cond type {type(cond).__name__}")


@dataclass
class Rollout:
    """One rollout of P prompts.

    Shapes (``...`` = latent shape): ``anchor [P, T+1, ...]`` (G2RPO's ODE trajectory from
    the noise, None for trajectory strategies), ``x_k [P, S, ...]`` (states the SDE steps
    leave from; S = K for G2RPO), ``x_next [P, K, G, ...]`` and ``log_probs [P, K, G]`` (the
    SDE transitions and their old log-probs), ``finals [P, K', J, G, ...]`` (final latents
    per advantage slot, granularity and branch). ``source_of [K, G]`` maps a transition to
    its row of ``x_k``; ``step_index [K]`` is the transition's grid index; transition
    ``(k, g)`` is scored by ``finals[:, adv_slot_of[k], :, g]``.
    """

    strategy: str
    sigmas: torch.Tensor
    eta: float
    sde_kind: str
    anchor: torch.Tensor | None
    x_k: torch.Tensor
    x_next: torch.Tensor
    log_probs: torch.Tensor
    finals: torch.Tensor
    source_of: torch.Tensor
    step_index: torch.Tensor
    adv_slot_of: torch.Tensor
    sde_indices: tuple[int, ...]
    granularities: tuple[int, ...]
    forward_rows: int
    forward_calls: int
    padded_rows: int = 0  # rows a compiled model evaluated only to fill a bucketed chunk shape

    @property
    def num_prompts(self) -> int:
        return self.finals.shape[0]

    @property
    def reward_shape(self) -> tuple[int, int, int, int]:
        """``(P, K', J, G)``: the shape of one reward model's scores of ``finals``."""
        return tuple(self.finals.shape[:4])

    def flat_finals(self) -> torch.Tensor:
        """All final latents as ``[P * K' * J * G, ...]`` (for decoding and scoring)."""
        return self.finals.reshape(-1, *self.finals.shape[4:])

    def training_units(self):
        """What a trainer needs, for any strategy: one unit per (prompt, transition slot, source state)
        (:func:`g2rpo.rollout.units.training_units`)."""
        return training_units(self)


def _branch_noise(per_prompt: int, P: int, shape: torch.Size, generator, device,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal SDE noise ``[P * per_prompt, ...]`` (prompt-major), drawn in ``dtype`` (the public G2RPO and
    MixGRPO steps draw it in the model output's bf16), returned as fp32.

    ``generator`` is None, one generator, or a list of P generators (one per prompt, so a
    prompt's rollout does not depend on which other prompts share the call: what makes
    rollouts identical whatever the number of ranks).
    """
    if isinstance(generator, (list, tuple)):
        out = torch.cat([torch.randn((per_prompt, *shape), generator=g, device=device, dtype=dtype) for g in generator])
    else:
        out = torch.randn((P * per_prompt, *shape), generator=generator, device=device, dtype=dtype)
    return out.float()


def default_buckets(max_batch: int) -> tuple[int, ...]:
    """The padded chunk sizes of a compiled model: max_batch / 8, / 4, / 2 and max_batch (at most 4 shapes)."""
    return tuple(sorted({max(1, -(-max_batch // d)) for d in (8, 4, 2, 1)}))


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with its last row repeated up to ``rows`` rows (padding rows are real inputs: always finite)."""
    n = t.shape[0]
    return t if n == rows else torch.cat([t, t[-1:].expand(rows - n, *t.shape[1:])])


class RolloutEngine:
    """Runs plans through a velocity model ``model(x [B, ...], sigma [B], cond) -> v``."""

    def __init__(self, model: VelocityModel, num_steps: int = 16, *, shift: float = 3.0, max_batch: int | None = 64,
                 quantize_timesteps: bool = False, check_finite: bool = True, ops_backend: str = "auto",
                 cuda_graphs: bool = False, compile_options: Mapping[str, object] | None = None,
                 batch_buckets: Sequence[int] | None = None, schedule_precision: str = "float64",
                 sigmas: torch.Tensor | Sequence[float] | None = None) -> None:
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError(f"max_batch must be an int >= 1 or None, got {max_batch!r}")
        if (cuda_graphs or compile_options is not None) and max_batch is None:
            raise ValueError("compiled rollouts (cuda_graphs / compile_options) need a max_batch: "
                             "the chunk shapes are bucketed up to it")
        if batch_buckets is not None:
            batch_buckets = tuple(sorted({int(b) for b in batch_buckets}))
            if not batch_buckets or batch_buckets[0] < 1 or (max_batch is not None and batch_buckets[-1] != max_batch):
                raise ValueError(f"batch_buckets must be ints >= 1 whose largest is max_batch ({max_batch}), "
                                 f"got {batch_buckets}")
        self.model = model
        # the schedule: given (a pipeline's own, :meth:`~g2rpo.models.base.PolicyAdapter.pipeline_sigmas`), or the
        # static shift of linspace(1, 0, T + 1)
        self.sigmas = sigma_schedule(num_steps, shift, schedule_precision) if sigmas is None else \
            check_sigmas(sigmas, num_steps)
        self.max_batch = max_batch
        #: called before every tick of :meth:`run` (the trainer's stop check: it may raise to abandon a rollout)
        self.tick_hook: Callable[[], None] | None = None
        self.quantize_timesteps = quantize_timesteps
        #: the dtype SDE-step noise is drawn in (then used as fp32): fp32, or the model output's bf16 as the public
        #: G2RPO / MixGRPO steps draw it (``randn_tensor(..., dtype=model_output.dtype)``)
        self.step_noise_dtype: torch.dtype = torch.float32
        self.check_finite = check_finite
        self.ops_backend = ops_backend  # the fused SDE step of g2rpo.ops (auto: Triton on GPU, C++ on CPU)
        # CUDA graphs: the model runs under torch.compile(mode="reduce-overhead"), which captures one
        # graph per distinct chunk shape with static buffers and replays it; off on CPU, where there is
        # no launch overhead to remove. `compile_options` compiles on any device (torch.compile kwargs).
        # A compiled model sees chunks padded up to a few row counts (`batch_buckets`, by default
        # max_batch / 8, / 4, / 2, max_batch): a rollout then compiles at most 4 graphs, far below
        # dynamo's recompile limit (8), past which it would silently fall back to eager. With
        # compile_options={"dynamic": True} (not CUDA graphs) one graph takes any row count, unpadded.
        self.cuda_graphs = cuda_graphs
        self.compile_options = dict(compile_options) if compile_options is not None else None
        self.batch_buckets = batch_buckets or (default_buckets(max_batch) if max_batch is not None else None)
        self.padded_rows = 0  # rows added by bucketing since the engine was built (the padding waste)
        self._compiled = None

    @property
    def num_steps(self) -> int:
        return self.sigmas.numel() - 1

    def velocity(self, x: torch.Tensor, index: torch.Tensor, prompt: torch.Tensor, cond: object) -> tuple[torch.Tensor, int]:
        """Velocities of rows ``x`` at grid ``index`` in chunks; returns (v fp32, number of model calls)."""
        n = x.shape[0]
        step = n if self.max_batch is None else self.max_batch
        sig = self.sigmas.to(device=x.device, dtype=torch.float32)[index.to(x.device)]
        sig_in = model_timesteps(sig, self.quantize_timesteps)
        out, calls = [], 0
        model, bucketed = self._model_for(x.device)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            xc, sc, pc = x[lo:hi], sig_in[lo:hi], prompt[lo:hi]
            if bucketed:
                xc, sc, pc = (_pad_rows(t, self._bucket(hi - lo)) for t in (xc, sc, pc))
                self.padded_rows += xc.shape[0] - (hi - lo)
            v = model(xc, sc, gather_cond(cond, pc))
            if bucketed and isinstance(v, torch.Tensor):
                v = v[:hi - lo]
            calls += 1
            if not isinstance(v, torch.Tensor) or v.shape != x[lo:hi].shape:
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"model returned {got} for input of shape {tuple(x[lo:hi].shape)}")
            v = v.float()
            if self.check_finite and not torch.isfinite(v).all():
                bad = (~torch.isfinite(v.reshape(hi - lo, -1))).any(dim=1)
                sigmas = sorted({round(s, 6) for s in sig[lo:hi][bad.to(sig.device)].tolist()})
                raise ValueError(f"model returned non-finite velocity at sigma={sigmas}")
            out.append(v)
        return torch.cat(out) if len(out) > 1 else out[0], calls

    def _bucket(self, rows: int) -> int:
        return next(b for b in self.batch_buckets if b >= rows)

    def _model_for(self, device: torch.device) -> tuple[VelocityModel, bool]:
        """The model to call on ``device`` and whether its chunks are padded to ``batch_buckets``."""
        graphs = self.cuda_graphs and device.type == "cuda"
        if not graphs and self.compile_options is None:
            return self.model, False
        # dynamic=True (compile_options): one graph with a symbolic row count, so chunks are not padded (on CPU,
        # where a graph is not a static CUDA graph and padding only wastes rows)
        dynamic = bool((self.compile_options or {}).get("dynamic")) and not graphs
        if self._compiled is None:
            opts = {"fullgraph": True, "dynamic": False, **(self.compile_options or {})}
            if graphs:
                opts["mode"], opts["dynamic"] = "reduce-overhead", False
            compiled = torch.compile(self.model, **opts)

            def call(x, sigma, cond):  # copy out of a CUDA graph's static output buffer
                out = compiled(x, sigma, cond)
                return out.clone() if graphs else out

            self._compiled = call
        return self._compiled, not dynamic

    @torch.no_grad()
    def sample_ode(self, noise: torch.Tensor, cond: object = None) -> torch.Tensor:
        """Plain batched Euler ODE sampling of ``noise [P, ...]`` (one row per prompt) to the image latent."""
        _check_cond(cond, noise.shape[0])
        x = noise.float()
        rows = torch.arange(x.shape[0], device=x.device)
        for i in range(self.num_steps):
            index = torch.full_like(rows, i)
            v, _ = self.velocity(x, index, rows, cond)
            x = ode_step(v, x, self.sigmas.to(x.device), i, i + 1)
        return x

    def run(self, plan: Plan, noise: torch.Tensor, cond: object, eta: float, sde_kind: str,
            generator: torch.Generator | list[torch.Generator] | None = None) -> dict[str, object]:
        """Execute ``plan`` from ``noise`` (``[P, ...]``, or ``[P, R, ...]`` for a plan with R roots)."""
        if plan.num_steps != self.num_steps:
            raise ValueError(f"plan has {plan.num_steps} steps, engine has {self.num_steps}")
        if not isinstance(noise, torch.Tensor) or noise.ndim < 2:
            raise ValueError("noise must be a tensor [P, ...] with one initial noise per prompt")
        R = plan.num_roots
        if R > 1:
            if noise.ndim < 3 or noise.shape[1] != R:
                raise ValueError(f"this strategy starts from {R} independent noises per prompt: "
                                 f"noise must be [P, {R}, ...], got {tuple(noise.shape)}")
            roots = noise.float()
        else:
            roots = noise.float().unsqueeze(1)
        P, shape = roots.shape[0], roots.shape[2:]
        if P == 0:
            raise ValueError("noise holds no prompt (P = 0): a rollout needs at least one prompt")
        if isinstance(generator, (list, tuple)) and len(generator) != P:
            raise ValueError(f"got {len(generator)} generators for {P} prompts (pass one per prompt or a single one)")
        _check_cond(cond, P)
        dev = roots.device
        sigmas = self.sigmas.to(dev)
        K, G, J, Kf = plan.num_k, plan.group_size, plan.num_j, plan.num_final_k
        anchor = roots.new_empty(P, plan.num_anchor, *shape) if plan.num_anchor else None
        x_k = roots.new_empty(P, plan.num_sources, *shape)
        x_next = roots.new_empty(P, K * G, *shape)
        log_probs = roots.new_empty(P, K * G)
        finals = roots.new_empty(P, Kf * J * G, *shape)
        for r, t in plan.root_capture:
            anchor[:, t] = roots[:, r]

        X = roots.reshape(-1, *shape)  # frontier rows (the roots), prompt-major
        rows = calls = 0
        padded_before = self.padded_rows
        p_idx = torch.arange(P, device=dev)
        for tick in plan.ticks:
            if self.tick_hook is not None:
                self.tick_hook()
            F = tick.frontier_index.numel()
            f_index = tick.frontier_index.to(dev).repeat(P)
            V, c = self.velocity(X, f_index, p_idx.repeat_interleave(F), cond)
            rows, calls = rows + P * F, calls + c
            Xf = X.view(P, F, *shape)
            pos, slot = tick.source_capture
            if pos.numel():
                x_k[:, slot.to(dev)] = Xf[:, pos.to(dev)]

            C = tick.child_index.numel()
            children = X.new_empty(P, C, *shape)
            for sel, is_sde in ((tick.ode_pos, False), (tick.sde_pos, True)):
                if not sel.numel():
                    continue
                sel = sel.to(dev)
                parent = (p_idx[:, None] * F + tick.child_parent.to(dev)[sel][None, :]).reshape(-1)
                frm = f_index[parent]
                if is_sde:
                    eps = _branch_noise(parent.numel() // P, P, shape, generator, dev, self.step_noise_dtype)
                    a, b, std = sde_coefficients(sigmas, frm, eta, sde_kind)
                    xs, lp = sde_step_logprob(X[parent], V[parent], eps, a, b, std, backend=self.ops_backend)
                    slot = tick.sde_slot.to(dev)
                    log_probs[:, slot] = lp.view(P, -1)
                    x_next[:, slot] = xs.view(P, -1, *shape)
                else:
                    to = tick.child_index.to(dev)[sel].repeat(P)
                    xs = ode_step(V[parent], X[parent], sigmas, frm, to)
                children[:, sel] = xs.view(P, -1, *shape)
            for (pos, slot), out in ((tick.anchor_capture, anchor), (tick.final_capture, finals)):
                if pos.numel():
                    out[:, slot.to(dev)] = children[:, pos.to(dev)]
            keep = tick.child_keep.to(dev)
            X = children[:, keep].reshape(-1, *shape)
        return {
            "anchor": anchor,
            "x_k": x_k,
            "x_next": x_next.view(P, K, G, *shape),
            "log_probs": log_probs.view(P, K, G),
            "finals": finals.view(P, Kf, J, G, *shape),
            "forward_rows": rows,
            "forward_calls": calls,
            "padded_rows": self.padded_rows - padded_before,
        }
