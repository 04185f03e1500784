"""The trainer: one iteration is prompts -> rollout -> score -> advantages -> update -> log -> checkpoint.

Set-up (the policy, optimizer, schedule) lives in :mod:`.setup`, the config's checks in :mod:`.checks`, the update
(the trained transitions' draw, the optimizer steps, the loss) in :mod:`.update`, the granularities (MGAI
diagnostics, auto granularity) in :mod:`.granularity`, the cost and metrics in :mod:`.metrics`, logs and grids in
:mod:`.logs`, the run directory (files, lock, resume rules) in :mod:`.rundir`, restoring a checkpoint into the
stateful components in :mod:`.resume`, signals in :mod:`.interrupts`, validation during training in :mod:`.validation`.
"""

from __future__ import annotations

import signal
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..advantage import batch_std, check_finite_rewards, integrate_advantages, reward_weights
from ..checkpoint import CheckpointWriteError, complete_checkpoints, rng_state, save_checkpoint, set_rng_state
from ..config import ConfigError, TrainConfig, config_to_dict
from ..distributed import DistContext, rollout_mode
from ..models.loading import TORCH_DTYPES
from ..rewards.configured import build_rewards, score_in_chunks
from ..rewards.remote import RemoteRewardError
from ..prompts import PromptSchedule
from ..rollout import Rollout, RolloutSampler
from .checks import check_config
from .granularity import GranularityController
from .interrupts import Interrupted, RolloutStopped, StopNow, StopRequest, fault_point
from .logs import ProgressBar, RunLog, save_sample_grid
from .metrics import CostMeter, FallbackCounter, advantage_stats, reduce_ops, reward_metrics
from .resume import component_states, restore_newest
from .update import PolicyUpdate, TrainingError
from .rundir import RunDir, preflight
from .validation import Validator
from .setup import apply_lr, autocast, build_optimizer, build_policy, export_policy, run_schedule, seed_of

__all__ = ["Trainer", "TrainingError"]

class Trainer:
    """Owns the policy, optimiser, sampler and rewards; ``run()`` trains to ``cfg.iterations``."""

    def __init__(self, cfg: TrainConfig, log=print) -> None:
        self.cfg, self.updating = cfg, False  # updating: the weights are changing (a signal then writes nothing)
        self.ctx = DistContext.init(timeout_s=cfg.dist_timeout_s)
        self.log = log if self.ctx.is_main else (lambda *a, **k: None)
        # a config built in Python, not by load_config + check_config, is checked here too; M's subset: sampler seed
        strategy = check_config(cfg, subset_seed=cfg.sampler_seed)
        if cfg.data.prompts_per_iteration % self.ctx.world:
            raise ConfigError(f"data.prompts_per_iteration ({cfg.data.prompts_per_iteration}) must be divisible "
                              f"by the number of ranks ({self.ctx.world})")
        prompts, prompt_images = preflight(cfg)
        if cfg.sampler.group_size == 2:
            msg = ("sampler.group_size=2: a group of two standardises to advantages of +-0.707 whatever the rewards "
                   "(a sign-only signal); use 4 or more for a graded one")
            warnings.warn(msg, stacklevel=2)
            self.log(f"warning: {msg}")
        self.rundir = RunDir(cfg, self.ctx, self.log)
        self.out, candidates = self.rundir.out, self.rundir.candidates
        self.changes = self.rundir.resume_changes(cfg) if cfg.resume else []
        self.prompts = PromptSchedule(prompts, cfg.seed, cfg.data.shuffle)
        torch.manual_seed(cfg.seed)
        self.setup = s = build_policy(cfg, self.ctx, self.log, prompt_images=prompt_images)
        self.policy, self.module, self.base_path, self.compute_dtype = s.policy, s.module, s.base_path, s.compute_dtype
        self.optimizer, self.scheduler = build_optimizer(cfg, s.params)
        self.ema = ({n: p.detach().clone().float() for n, p in self.module.named_parameters() if p.requires_grad}
                    if cfg.ema_decay is not None else None)
        self.sampler = RolloutSampler(self.policy, max_batch=cfg.sampler.max_batch, strategy=strategy,
                                      sigmas=run_schedule(cfg, self.policy, strategy, self.log),
                                      quantize_timesteps=cfg.sampler.quantize_timesteps, ops_backend=cfg.ops_backend,
                                      cuda_graphs=cfg.sampler.cuda_graphs, compile_options=cfg.sampler.compile_options,
                                      step_noise_dtype=TORCH_DTYPES[cfg.sampler.step_noise_dtype])
        self.rewards = build_rewards(cfg.rewards, cfg.model, self.base_path, prompt_file=cfg.data.prompts)
        self.update = PolicyUpdate(cfg, s, self.optimizer, self.scheduler, self.ema, self.ctx, self.autocast)
        self.meter = CostMeter(cfg.model.gradient_checkpointing)  # the run's cost (a max_cost budget survives --resume)
        self.granularity = GranularityController(cfg, self.sampler, self._weights(), self.log)
        self.fallbacks = FallbackCounter()  # a served judge's unparseable answers over the run
        self.validator = Validator(cfg, self.policy, self.ctx, self.base_path, self.rewards, self.log)
        self.components = {"update": self.update, "cost": self.meter, "granularity": self.granularity,
                           "fallbacks": self.fallbacks, "validation": self.validator}
        self.start_iteration = self._restore(candidates) if cfg.resume else 0
        self.runlog = RunLog(self.out, cfg, self.ctx.is_main, self.start_iteration, self.log)
        self.stop: StopRequest | None = None  # set while run() holds the signal handlers

    def _restore(self, candidates: list[Path]) -> int:
        """The newest loadable checkpoint into the weights and every component (:func:`.resume.restore_newest`)."""
        ckpt, state = restore_newest(self.ctx, candidates, self.module, self.optimizer, self.ema, self.components,
                                     self.log)
        if self.changes:
            apply_lr(self.cfg, self.scheduler)
            self.log("resume: applied config changes: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in self.changes))
        self.log(f"resumed from {ckpt} after iteration {int(state['iteration'])}")
        return int(state["iteration"])

    @property
    def complete(self) -> bool:
        """All ``iterations`` done, or the ``max_cost`` budget spent."""
        return self.start_iteration >= self.cfg.iterations or self.budget_spent

    @property
    def budget_spent(self) -> bool:
        return self.cfg.max_cost is not None and self.cost >= self.cfg.max_cost

    def autocast(self):
        return autocast(self.ctx.device, self.compute_dtype)

    # ---- one iteration ----------------------------------------------------------------
    def local_prompts(self, iteration: int) -> tuple[list[int], list[str]]:
        n = self.cfg.data.prompts_per_iteration
        positions = self.prompts.indices(iteration, n)
        per_rank = n // self.ctx.world
        mine = positions[self.ctx.rank * per_rank:(self.ctx.rank + 1) * per_rank]
        return mine, [self.prompts.prompt_at(i) for i in mine]

    def _noise(self, iteration: int, positions: list[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
        """The prompts' initial noise and SDE-noise generators, seeded by (sampler seed, iteration, prompt position)."""
        device = self.ctx.device
        starts = [torch.Generator(device=device).manual_seed(seed_of(self.cfg.sampler_seed, iteration, pos, 0))
                  for pos in positions]
        noise = self.sampler.per_prompt_noise(self.policy.prepare_latents, starts, device, iteration)
        gens = [torch.Generator(device=device).manual_seed(seed_of(self.cfg.sampler_seed, iteration, pos, 1))
                for pos in positions]
        return noise, gens

    def score_rewards(self, rollout: Rollout, prompts: list[str], iteration: int) -> torch.Tensor:
        """Rewards ``[R, P, K', J, G]`` of the rollout's final latents, decoded and scored in chunks."""
        P, Kf, J, G = rollout.reward_shape
        per_image = [p for p in prompts for _ in range(Kf * J * G)]
        try:
            rewards = score_in_chunks(self.rewards, self.policy.decode, rollout.flat_finals(), per_image,
                                      self.cfg.reward_batch, self.ctx.device).reshape(-1, P, Kf, J, G)
        except RemoteRewardError as err:  # a served reward is down: stop cleanly, the checkpoint is intact
            raise TrainingError(f"iteration {iteration + 1}: {err}; the last checkpoint is intact (--resume once "
                                "the server is back)") from None
        try:
            check_finite_rewards(rewards, [n for n, _, _ in self.rewards])
        except ValueError as err:
            bad = (~torch.isfinite(rewards)).flatten(2).any(dim=(0, 2)).nonzero().flatten().tolist()
            raise TrainingError(f"iteration {iteration + 1}: {err}; prompts {[prompts[i] for i in bad]}") from None
        return rewards

    def advantages(self, rewards: torch.Tensor, rollout: Rollout) -> torch.Tensor:
        """``[P, K, G]``: Eq. 11 per the ``advantage`` config, mapped to the transitions' slots."""
        a = self.cfg.advantage
        std = None
        if a.std == "batch":  # Flow-GRPO's global_std: the std of every rank's rewards
            std = batch_std(rewards, a.unbiased, all_reduce=self.ctx.all_reduce_sum)  # a no-op on one rank
        adv = integrate_advantages(rewards, self._weights(), eps=a.eps, unbiased=a.unbiased, std=std)
        return adv[:, rollout.adv_slot_of.to(adv.device)]

    def iteration(self, iteration: int) -> dict[str, float]:
        """Iteration ``iteration`` (0-based; logged 1-based)."""
        t0, self.updating = time.perf_counter(), False
        positions, prompts = self.local_prompts(iteration)
        cond = self.policy.encode_prompts(prompts)
        noise, gens = self._noise(iteration, positions)
        fault_point(iteration, "rollout")
        try:
            with rollout_mode(self.module), self.autocast():
                rollout = self.sampler.rollout(noise, cond, generator=gens, iteration=iteration)
        except ValueError as err:  # a non-finite velocity
            raise TrainingError(f"iteration {iteration + 1}: rollout failed: {err}; prompts {prompts}") from None
        t1 = time.perf_counter()
        fault_point(iteration, "score")
        rewards = self.score_rewards(rollout, prompts, iteration)
        t2 = time.perf_counter()
        adv = self.advantages(rewards, rollout)
        if self.stop is not None:  # the last point where the iteration can be abandoned (no weight changed)
            self.stop.check()
        fault_point(iteration, "train")
        self.updating = True  # from here a second signal leaves no state worth writing (weights change)
        m = self.train_on(rollout, adv, cond, iteration, prompts)
        t3 = time.perf_counter()
        m.update(self.granularity.diagnostics(rewards, rollout))
        m.update(reward_metrics(self.rewards, rewards, rollout.granularities), **self.fallbacks.new(self.rewards))
        m.update({**advantage_stats(adv, self.ctx), "forward_rows": float(rollout.forward_rows),
                  "lr": self.scheduler.get_last_lr()[0], "time_rollout": t1 - t0, "time_reward": t2 - t1,
                  "time_train": t3 - t2, "time_iteration": t3 - t0,
                  "cost/rollout_rows": float(rollout.forward_rows),
                  "cost/recompute_rows": float(m.get("recompute_forward_rows", 0.0)),
                  "cost/transformer_rows_per_row": float(self.policy.transformer_rows_per_row)})
        m = self.ctx.reduce_metrics(m, reduce_ops(m))
        m["iteration"] = iteration + 1
        self.meter.add(m)
        self.fallbacks.add(m)
        self.granularity.observe(m, rollout)  # on the reduced metrics: every rank decides alike
        if self.cfg.image_every and (iteration + 1) % self.cfg.image_every == 0:
            self.save_grid(iteration + 1)
        return m

    @property
    def cost(self) -> float:
        """The run's cumulative cost so far (forward-row equivalents)."""
        return self.meter.cost

    def _weights(self) -> list[float]:
        """The rewards' weights in Eq. 11 (``advantage.normalize_weights``: divided by their sum, MixGRPO's code)."""
        return reward_weights([w for _, _, w in self.rewards], self.cfg.advantage.normalize_weights)

    def train_on(self, rollout: Rollout, adv: torch.Tensor, cond: Any, iteration: int, prompts: list[str]) -> dict:
        """The policy update of one iteration (:meth:`.update.PolicyUpdate.train`)."""
        return self.update.train(rollout, adv, cond, iteration, prompts, self.sampler.strategy,
                                 self.sampler.plan(iteration))

    def save_grid(self, iteration: int) -> None:
        """ODE samples of fixed prompts with fixed noise, labelled (:func:`.logs.save_sample_grid`)."""
        with rollout_mode(self.module), self.autocast():
            save_sample_grid(self.out / "images" / f"iter_{iteration:06d}.png", self.policy, self.sampler.engine,
                             self.prompts.prompts, seed_of(self.cfg.sampler_seed, 7), self.ctx,
                             lambda path, gif: self.runlog.images(iteration, path, gif))

    def validate(self, iteration: int, m: dict[str, float] | None = None) -> None:  # the eval: section's
        self.validator.step(iteration, m, self.module, self.autocast, self.out, self.runlog, self.export)

    # ---- checkpoints, export, the loop ----------------------------------------------------
    def checkpoint(self, iteration: int) -> Path:
        self.update.check_finite_params(iteration, "before writing a checkpoint")  # never save a non-finite state
        state = {"prompts_consumed": iteration * self.cfg.data.prompts_per_iteration, "config": config_to_dict(self.cfg),
                 "world_size": self.ctx.world, "components": component_states(self.components)}
        try:
            return save_checkpoint(self.ctx, self.out, iteration, self.module, self.optimizer, self.ema, state)
        except CheckpointWriteError as err:
            raise TrainingError(f"iteration {iteration}: {err}") from None

    def export(self, folder: Path, iteration: int | None = None) -> Path:
        """The trained policy in diffusers' ``save_pretrained`` layout (EMA weights when enabled)."""
        return export_policy(self.cfg, self.ctx, self.module, self.ema, self.base_path, folder, iteration)

    def run(self, callback=None) -> list[dict[str, float]]:
        """Train to ``cfg.iterations``; ``callback(trainer, metrics)`` runs after every iteration.

        SIGINT / SIGTERM stop the run at the next safe point with a checkpoint (:mod:`.interrupts`):
        :class:`~.interrupts.Interrupted` is raised after it is written."""
        cfg, history = self.cfg, []
        bar = ProgressBar(self.ctx.is_main and cfg.progress, cfg.iterations, self.start_iteration, cfg.sampler.strategy)
        saved = self.start_iteration  # the iterations the newest checkpoint holds
        self.final_iteration = cfg.iterations
        try:
            with StopRequest(self.ctx, self.log) as stop:
                self.stop = stop
                self.sampler.engine.tick_hook = stop.check
                if self.validator.due(self.start_iteration):  # the base model (or a run that turned eval on)
                    self.validate(self.start_iteration)
                for it in range(self.start_iteration, cfg.iterations):
                    rng = rng_state()
                    try:
                        m = self.iteration(it)
                    except (RolloutStopped, StopNow) as err:  # before the update: the state is that of `it` iterations
                        if isinstance(err, StopNow) and (self.updating or self.ctx.enabled):
                            raise  # mid-update, or ranks that may not all have it: nothing to write safely
                        set_rng_state(rng)
                        if saved != it or not complete_checkpoints(self.out):
                            self.checkpoint(it)
                        if isinstance(err, StopNow):
                            raise StopNow(err.signum, saved=it) from None
                        raise Interrupted(it, stop.agreed() or signal.SIGINT) from None
                    self.rundir.check_intact(it + 1)
                    if callback is not None:
                        callback(self, m)
                    history.append(m)
                    done = it + 1
                    last = done == cfg.iterations or self.budget_spent  # max_cost: stop once the budget is spent
                    self.validator.observe(m)
                    if self.validator.due(done, last):
                        self.validate(done, m)
                    self.runlog.write(m)
                    bar.update(m)
                    signum = stop.agreed()
                    if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or last or signum is not None:
                        self.checkpoint(done)
                        saved = done
                    if last:
                        if self.budget_spent:
                            self.log(f"max_cost reached: {self.cost:,.0f} of {cfg.max_cost:,.0f} after iteration {done}")
                        self.final_iteration = done
                        break
                    if signum is not None:
                        raise Interrupted(done, signum)
                bar.close()
                if cfg.export_final and history:
                    self.export(self.out / "final", self.final_iteration)  # finished, even when a signal came
                signum = stop.agreed()
                if signum is not None:  # a signal during the last checkpoint or the export: stop here
                    raise Interrupted(self.final_iteration, signum, f"interrupted after the last iteration "
                                      f"({self.final_iteration}), its checkpoint and export written; nothing is left")
        finally:
            self.stop = None
            self.sampler.engine.tick_hook = None
            bar.close()
            self.runlog.close()
            self.rundir.release()  # the run's writes are done
        return history

    def close(self) -> None:
        """Release the output folder's lock and the process group."""
        self.runlog.close()
        self.rundir.release()
        self.ctx.close()
