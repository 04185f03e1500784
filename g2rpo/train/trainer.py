"""`python -m g2rpo.train` / `torchrun --nproc_per_node N -m g2rpo.train`: GRPO training.

One iteration: prompts -> rollout (the strategy's plan on the batched engine) -> decode ->
rewards ``[R, P, K', J, G]`` -> advantages (Eq. 11) -> the clipped surrogate (Eq. 12) at the
trained SDE steps, ONE forward per (prompt, source state) scoring every branch that
leaves it -> one optimiser step per minibatch. With no arguments it trains G2RPO on the
CPU lab world (``g2rpo/configs/lab.yaml``).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..advantage import batch_std, check_finite_rewards, integrate_advantages
from ..checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..config import ConfigError, TrainConfig, config_to_dict, load_config
from ..distributed import DistContext, is_fsdp, rollout_mode, shard_module
from ..loss import clipped_surrogate, gaussian_kl
from ..policy import TORCH_DTYPES, build_rewards, load_policy
from ..prompts import PromptSchedule, load_prompts
from ..rollout import G2RPOSampler, Rollout, make_strategy
from .update import optimizer_steps, recompute_old_logprobs, selection, slot_logprob, source_rows, work_units

__all__ = ["Trainer", "TrainingError"]


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite reward, loss or gradient); the last checkpoint is intact."""


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _fault_point(iteration: int, phase: str) -> None:
    """Fault injection for the kill-and-resume test: ``G2RPO_FAULT=kill@ITER:PHASE``."""
    spec = os.environ.get("G2RPO_FAULT")
    if spec and spec == f"kill@{iteration}:{phase}":
        os.kill(os.getpid(), signal.SIGKILL)


def _lr_lambda(cfg: TrainConfig):
    warm, total, kind = cfg.optim.warmup_iterations, cfg.iterations, cfg.optim.schedule

    def fn(it: int) -> float:
        if warm and it < warm:
            return (it + 1) / warm
        if kind == "constant":
            return 1.0
        frac = min(1.0, (it - warm) / max(1, total - warm))
        return 1.0 - frac if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))

    return fn


class Trainer:
    """Owns the policy, optimiser, sampler and rewards; ``run()`` trains to ``cfg.iterations``."""

    def __init__(self, cfg: TrainConfig, log=print) -> None:
        self.cfg = cfg
        self.ctx = DistContext.init()
        self.log = log if self.ctx.is_main else (lambda *a, **k: None)
        if cfg.data.prompts_per_iteration % self.ctx.world:
            raise ConfigError(f"data.prompts_per_iteration ({cfg.data.prompts_per_iteration}) must be divisible "
                              f"by the number of ranks ({self.ctx.world})")
        self.out = Path(cfg.output_dir)
        if not cfg.resume and latest_checkpoint(self.out) is not None:
            if not cfg.overwrite:
                raise ConfigError(f"output_dir {self.out} holds checkpoints of an earlier run: continue it with "
                                  "--resume, start over with overwrite=true, or pick another output_dir")
            if self.ctx.is_main:
                import shutil

                shutil.rmtree(self.out / "checkpoints")
            self.ctx.barrier()
        self.prompts = PromptSchedule(load_prompts(cfg.data.prompts), cfg.seed, cfg.data.shuffle)
        torch.manual_seed(cfg.seed)
        loaded = load_policy(cfg.model, log=self.log)
        self.base_path = loaded.path
        self.policy = loaded.policy.to(self.ctx.device)
        for p in self.policy.parameters():
            p.requires_grad_(False)
        self.module = self.policy.transformer
        # Mixed precision: model.dtype is the *compute* dtype. Trained weights are fp32 masters (an
        # lr of 2e-6 is below bf16's resolution: bf16 weights would not move); bf16 compute comes
        # from FSDP2's MixedPrecisionPolicy across ranks and from autocast in any case. Frozen parts
        # (VAE, text encoders, LoRA base weights) stay in model.dtype.
        self.compute_dtype = TORCH_DTYPES[cfg.model.dtype]
        velocity = getattr(self.policy, "velocity", self.policy)
        if hasattr(velocity, "compute_dtype"):  # the same input dtypes (timestep too) in rollout and training
            velocity.compute_dtype = self.compute_dtype
        if not cfg.lora.enabled and self.compute_dtype != torch.float32:
            self.module.to(torch.float32)
        if cfg.lora.enabled:
            from peft import LoraConfig

            self.module.add_adapter(LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
                                               target_modules=list(cfg.lora.target_modules),
                                               init_lora_weights="gaussian"))
        else:
            for p in self.module.parameters():
                p.requires_grad_(True)
        if cfg.model.gradient_checkpointing:
            self.module.enable_gradient_checkpointing()
        if cfg.model.attention_backend:
            try:  # diffusers checks that the backend's package (flash-attn, ...) is installed
                self.module.set_attention_backend(cfg.model.attention_backend)
            except (ValueError, RuntimeError, ImportError) as err:
                raise ConfigError(f"model.attention_backend={cfg.model.attention_backend!r}: {err}") from None
        self.ref_module = None
        if cfg.loss.kl_beta > 0 and not cfg.lora.enabled:
            import copy

            self.ref_module = copy.deepcopy(self.module).eval().requires_grad_(False)
        if self.ctx.enabled:
            shard_module(self.module, self.ctx.device,
                         param_dtype=None if self.compute_dtype == torch.float32 else self.compute_dtype)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg))
        self.ema = ({n: p.detach().clone().float() for n, p in self.module.named_parameters() if p.requires_grad}
                    if cfg.ema_decay is not None else None)
        strategy = make_strategy(cfg.sampler.strategy, **cfg.sampler.strategy_options())
        self.sampler = G2RPOSampler(self.policy, shift=cfg.sampler.shift, max_batch=cfg.sampler.max_batch,
                                    strategy=strategy, quantize_timesteps=cfg.sampler.quantize_timesteps,
                                    ops_backend=cfg.ops_backend, cuda_graphs=cfg.sampler.cuda_graphs)
        self.rewards = build_rewards(cfg.rewards, cfg.model, self.base_path)
        self.start_iteration = 0
        if cfg.resume:
            ckpt = latest_checkpoint(self.out)
            if ckpt is None:
                self.log(f"--resume: no complete checkpoint under {self.out}; starting from scratch")
            else:
                state = load_checkpoint(self.ctx, ckpt, self.module, self.optimizer, self.scheduler, self.ema)
                self.start_iteration = int(state["iteration"])
                self.log(f"resumed from {ckpt} at iteration {self.start_iteration}")
        self._writers = self._open_writers()

    # ---- one iteration ---------------------------------------------------------------
    def local_prompts(self, iteration: int) -> tuple[list[int], list[str]]:
        n = self.cfg.data.prompts_per_iteration
        positions = self.prompts.indices(iteration, n)
        per_rank = n // self.ctx.world
        mine = positions[self.ctx.rank * per_rank:(self.ctx.rank + 1) * per_rank]
        return mine, [self.prompts.prompt_at(i) for i in mine]

    def _noise(self, iteration: int, positions: list[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
        roots = self.sampler.plan(iteration).num_roots
        dev = self.ctx.device
        noise = []
        for pos in positions:
            g = torch.Generator(device=dev).manual_seed(_seed(self.cfg.sampler_seed, iteration, pos, 0))
            z = self.policy.prepare_latents(roots, g, device=dev)
            noise.append(z[0] if roots == 1 else z)
        gens = [torch.Generator(device=dev).manual_seed(_seed(self.cfg.sampler_seed, iteration, pos, 1))
                for pos in positions]
        return torch.stack(noise), gens

    def score(self, ro: Rollout, prompts: list[str], iteration: int) -> torch.Tensor:
        """Rewards ``[R, P, K', J, G]`` of the rollout's final latents."""
        P, Kf, J, G = ro.reward_shape
        flat = ro.flat_finals()
        per_image = [p for p in prompts for _ in range(Kf * J * G)]
        step = self.cfg.reward_batch
        parts: list[list[torch.Tensor]] = [[] for _ in self.rewards]
        for lo in range(0, flat.shape[0], step):  # decode and score in chunks: bounded image memory
            images = self.policy.decode(flat[lo:lo + step])
            for r, (_, model, _) in enumerate(self.rewards):
                parts[r].append(model.score(images, per_image[lo:lo + step]).float().to(self.ctx.device))
        scores = [torch.cat(p).reshape(P, Kf, J, G) for p in parts]
        rewards = torch.stack(scores)
        try:
            check_finite_rewards(rewards, [n for n, _, _ in self.rewards])
        except ValueError as err:
            bad = (~torch.isfinite(rewards)).flatten(2).any(dim=(0, 2)).nonzero().flatten().tolist()
            raise TrainingError(f"iteration {iteration + 1}: {err}; prompts {[prompts[i] for i in bad]}") from None
        return rewards

    def _slot_logprob(self, ro: Rollout, k: int, rows: slice, cond: Any, mask=None, need_mean: bool = False):
        return slot_logprob(self.policy, ro, k, rows, cond, mask=mask, quantize_timesteps=self.cfg.sampler.quantize_timesteps,
                            backend=self.cfg.ops_backend, need_mean=need_mean)

    def autocast(self):
        """Compute in ``model.dtype`` (no-op for float32)."""
        if self.compute_dtype == torch.float32:
            return torch.autocast(self.ctx.device.type, enabled=False)
        return torch.autocast(self.ctx.device.type, dtype=self.compute_dtype)

    @contextmanager
    def _reference_policy(self):
        """Run the policy as the frozen reference: LoRA adapters off, or the saved initial transformer."""
        with torch.no_grad():
            if self.cfg.lora.enabled:
                self.module.disable_adapters()
                try:
                    yield
                finally:
                    self.module.enable_adapters()
            else:
                owner = getattr(self.policy, "velocity", self.policy)  # the object holding `.transformer`
                saved, owner.transformer = owner.transformer, self.ref_module
                try:
                    yield
                finally:
                    owner.transformer = saved

    def train_on(self, ro: Rollout, adv: torch.Tensor, cond: Any, iteration: int, prompts: list[str]) -> dict[str, float]:
        """The policy update of one iteration (``iteration`` 0-based); returns local metrics."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(_seed(cfg.seed, iteration, 2))
        P, K, G = ro.log_probs.shape
        mask = self.sampler.strategy.train_mask(self.sampler.plan(iteration), P, gen)  # [P, K, G]
        steps = optimizer_steps(mask, cfg.optim.update_schedule, cfg.minibatches, cfg.optim.sample_minibatches,
                                cfg.inner_epochs, gen)
        trained = [k for k in range(K) if bool(mask[:, k].any())]
        S_max = max([source_rows(ro, k) for k in trained] or [1])
        steps_units = [work_units(m, max(1, cfg.train_batch // S_max)) for m in steps]
        ratios, clips, kls, grad_norms, step_devs = [], [], [], [], []
        loss_sum, loss_count = 0.0, 0
        first_dev = None
        self.module.train()
        old_logp, extra = ro.log_probs, {}
        recompute = cfg.loss.recompute_old_logprob
        if recompute == "auto":
            recompute = self.compute_dtype != torch.float32
        if recompute and steps:
            with self.autocast():
                old_logp, spent = recompute_old_logprobs(self.policy, ro, steps_units, cond,
                                                         quantize_timesteps=cfg.sampler.quantize_timesteps,
                                                         backend=cfg.ops_backend)
            extra = {"recompute_forward_rows": float(spent),
                     "old_logprob_max_dev": float((old_logp - ro.log_probs)[mask.to(old_logp.device)].abs().max())}
        for step, units in zip(steps, steps_units):
            n_total = int(step.sum())
            self.optimizer.zero_grad(set_to_none=True)
            step_ratios = []
            for w, unit in enumerate(units):
                k, rows, sub = unit
                sel = selection(unit, G).to(old_logp.device)
                if is_fsdp(self.module):
                    self.module.set_requires_gradient_sync(w == len(units) - 1)
                with self.autocast():
                    logp, mean, std = self._slot_logprob(ro, k, rows, cond, mask=sub, need_mean=cfg.loss.kl_beta > 0)
                sur = clipped_surrogate(logp, old_logp[rows, k][sel], adv[rows, k][sel.to(adv.device)],
                                        cfg.loss.clip_range, cfg.loss.adv_clip_max)
                loss = sur.loss.sum() / n_total
                if cfg.loss.kl_beta > 0:
                    with self._reference_policy(), self.autocast():
                        _, ref_mean, _ = self._slot_logprob(ro, k, rows, cond, mask=sub, need_mean=True)
                    kl = gaussian_kl(mean, ref_mean, std)
                    if cfg.loss.kl_convention == "flow_grpo":  # Flow-GRPO divides by 2 sigma_t^2, not 2 sigma_t^2 |dt|
                        e = int(ro.step_index[k])
                        kl = kl * float(ro.sigmas[e] - ro.sigmas[e + 1])
                    loss = loss + cfg.loss.kl_beta * kl.sum() / n_total
                    kls.append(kl.detach())
                if not torch.isfinite(loss):
                    bad_rows = sel.nonzero()[:, 0][~torch.isfinite(sur.loss)].unique().tolist()
                    bad = sorted({prompts[rows.start + i] for i in bad_rows})
                    raise TrainingError(f"iteration {iteration + 1}: non-finite loss at SDE step "
                                        f"{int(ro.step_index[k])} for prompts {bad}")
                loss.backward()
                if first_dev is None:
                    first_dev = float((sur.ratio - 1).abs().max())
                step_ratios.append(sur.ratio.flatten())
                clips.append(sur.clipped.flatten().float())
                loss_sum += float(loss.detach()) * n_total
                loss_count += sur.loss.numel()
            gn = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.max_grad_norm)
            gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
            if not math.isfinite(gn):
                raise TrainingError(f"iteration {iteration + 1}: non-finite gradient norm ({gn}); "
                                    f"prompts {prompts}")
            grad_norms.append(gn)
            self.optimizer.step()
            self._update_ema()
            ratios += step_ratios
            step_devs.append(float((torch.cat(step_ratios) - 1).abs().max()))
        self.scheduler.step()
        if not steps:  # nothing trained this iteration (e.g. an empty MixGRPO window)
            return {"ratio_mean": 1.0, "ratio_min": 1.0, "ratio_max": 1.0, "ratio_first_max_dev": 0.0,
                    "ratio_last_step_max_dev": 0.0, "clip_frac": 0.0, "loss": 0.0, "grad_norm": 0.0,
                    "trained_steps": 0.0, "optimizer_steps": 0.0, **extra}
        r = torch.cat(ratios)
        m = {"ratio_mean": float(r.mean()), "ratio_min": float(r.min()), "ratio_max": float(r.max()),
             "ratio_first_max_dev": first_dev, "ratio_last_step_max_dev": step_devs[-1],
             "clip_frac": float(torch.cat(clips).mean()), "loss": loss_sum / loss_count,
             "grad_norm": float(np.mean(grad_norms)), "trained_steps": float(len(trained)),
             "optimizer_steps": float(len(steps)), **extra}
        if kls:
            m["kl"] = float(torch.cat(kls).mean())
        return m

    def _adv_stats(self, adv: torch.Tensor) -> dict[str, float]:
        """Mean, std and max |.| of the advantages over every rank (not a mean of per-rank stds)."""
        a = adv.double().flatten()
        stats = torch.tensor([a.sum().item(), (a * a).sum().item(), float(a.numel())], dtype=torch.float64)
        self.ctx.all_reduce_sum(stats)
        s1, s2, n = stats.tolist()
        if n == 0:
            return {"adv_mean": 0.0, "adv_std": 0.0, "adv_abs_max": 0.0}
        var = max(0.0, s2 - s1 * s1 / n) / max(1.0, n - 1)
        return {"adv_mean": s1 / n, "adv_std": math.sqrt(var),
                "adv_abs_max": float(a.abs().max()) if a.numel() else 0.0}

    def _update_ema(self) -> None:
        if self.ema is None:
            return
        with torch.no_grad():
            for n, p in self.module.named_parameters():
                if n in self.ema:
                    self.ema[n].lerp_(p.detach().float(), 1.0 - self.cfg.ema_decay)

    def iteration(self, iteration: int) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        positions, prompts = self.local_prompts(iteration)
        cond = self.policy.encode_prompts(prompts)
        noise, gens = self._noise(iteration, positions)
        _fault_point(iteration, "rollout")
        with rollout_mode(self.module), self.autocast():
            ro = self.sampler.rollout(noise, cond, generator=gens, iteration=iteration)
        t1 = time.perf_counter()
        rewards = self.score(ro, prompts, iteration)
        t2 = time.perf_counter()
        weights = [w for _, _, w in self.rewards]
        a = cfg.advantage
        std = None
        if a.std == "batch":  # Flow-GRPO's global_std: the std of every rank's rewards
            std = batch_std(rewards, a.unbiased, all_reduce=self.ctx.all_reduce_sum if self.ctx.enabled else None)
        adv_final = integrate_advantages(rewards, weights, eps=a.eps, unbiased=a.unbiased, std=std)  # [P, K', G]
        adv = adv_final[:, ro.adv_slot_of.to(adv_final.device)]  # [P, K, G]
        _fault_point(iteration, "train")
        m = self.train_on(ro, adv, cond, iteration, prompts)
        t3 = time.perf_counter()
        for r, (name, _, _) in enumerate(self.rewards):
            m[f"reward/{name}"] = float(rewards[r].mean())
            for j, lam in enumerate(ro.granularities):
                m[f"reward/{name}/lambda{lam}"] = float(rewards[r, :, :, j].mean())
        m.update({**self._adv_stats(adv),
                  "forward_rows": float(ro.forward_rows), "lr": self.scheduler.get_last_lr()[0],
                  "time_rollout": t1 - t0, "time_reward": t2 - t1, "time_train": t3 - t2,
                  "time_iteration": t3 - t0})
        ops = {"ratio_min": "min", "ratio_max": "max", "ratio_first_max_dev": "max", "ratio_last_step_max_dev": "max", "adv_abs_max": "max", "adv_mean": "max", "adv_std": "max",
               "forward_rows": "sum", "time_rollout": "max", "time_reward": "max", "time_train": "max",
               "time_iteration": "max", "recompute_forward_rows": "sum", "old_logprob_max_dev": "max"}
        m = self.ctx.reduce_metrics(m, ops)
        m["iteration"] = iteration + 1
        if cfg.image_every and (iteration + 1) % cfg.image_every == 0 and self.ctx.is_main:
            self._save_grid(ro, iteration + 1)
        return m

    # ---- logging, checkpoints, export --------------------------------------------------
    def _open_writers(self) -> dict[str, Any]:
        writers: dict[str, Any] = {}
        if not self.ctx.is_main:
            return writers
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(config_to_dict(self.cfg), indent=1))
        metrics = self.out / "metrics.jsonl"
        if metrics.exists():  # keep what the resumed-from checkpoint covers, drop the lost tail
            kept = [line for line in metrics.read_text().splitlines()
                    if line.strip() and json.loads(line)["iteration"] <= self.start_iteration]
            metrics.write_text("".join(line + "\n" for line in kept))
        writers["jsonl"] = metrics.open("a")
        if self.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                writers["tb"] = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                pass
        if self.cfg.wandb:
            try:
                import wandb

                writers["wandb"] = wandb.init(project=self.cfg.wandb_project, config=config_to_dict(self.cfg),
                                              dir=str(self.out), resume="allow")
            except ImportError:
                self.log("wandb requested but not installed: pip install wandb")
        return writers

    def _write(self, m: dict[str, float]) -> None:
        if not self.ctx.is_main:
            return
        self._writers["jsonl"].write(json.dumps(m) + "\n")
        self._writers["jsonl"].flush()
        if "tb" in self._writers:
            for k, v in m.items():
                if k != "iteration" and v is not None:
                    self._writers["tb"].add_scalar(k, v, m["iteration"])
        if "wandb" in self._writers:
            self._writers["wandb"].log(m, step=m["iteration"])

    def _save_grid(self, ro: Rollout, iteration: int) -> None:
        from torchvision.utils import save_image

        images = self.policy.decode(ro.finals[:, 0, 0].reshape(-1, *ro.finals.shape[4:]))
        if images.ndim == 3:
            images = images[:, None]
        (self.out / "images").mkdir(exist_ok=True)
        save_image(images.float().cpu(), self.out / "images" / f"iter_{iteration:06d}.png",
                   nrow=ro.finals.shape[3], padding=1)

    def checkpoint(self, iteration: int) -> Path:
        extra = {"prompts_consumed": iteration * self.cfg.data.prompts_per_iteration, "config": config_to_dict(self.cfg)}
        return save_checkpoint(self.ctx, self.out, iteration, self.module, self.optimizer, self.scheduler, self.ema,
                               extra)

    def export(self, folder: Path) -> Path:
        """The trained policy in diffusers' ``save_pretrained`` layout (EMA weights when enabled)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.ema is not None:
            for n, t in self.ema.items():
                full[n] = (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu()
        if self.ctx.is_main:
            fresh = load_policy(self.cfg.model, log=lambda *a, **k: None).policy
            if self.cfg.lora.enabled:
                from peft import LoraConfig

                fresh.transformer.add_adapter(LoraConfig(r=self.cfg.lora.rank, lora_alpha=self.cfg.lora.alpha,
                                                         target_modules=list(self.cfg.lora.target_modules)))
            fresh.transformer.load_state_dict(full, strict=True)
            if self.cfg.lora.enabled:
                fresh.transformer.fuse_lora()
                fresh.transformer.unload_lora()
            fresh.save_pretrained(folder)
            rewards = self.base_path / "rewards"
            if rewards.is_dir() and not (folder / "rewards").exists():
                import shutil

                shutil.copytree(rewards, folder / "rewards")
        self.ctx.barrier()
        return folder

    def run(self, callback=None) -> list[dict[str, float]]:
        """Train to ``cfg.iterations``; ``callback(trainer, metrics)`` runs after every iteration."""
        cfg = self.cfg
        history = []
        bar = None
        if self.ctx.is_main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.iterations, initial=self.start_iteration, desc="g2rpo", dynamic_ncols=True,
                       file=sys.stdout)
        for it in range(self.start_iteration, cfg.iterations):
            m = self.iteration(it)
            if callback is not None:
                callback(self, m)
            history.append(m)
            self._write(m)
            if bar is not None:
                main_reward = next(k for k in m if k.startswith("reward/") and k.count("/") == 1)
                bar.set_postfix({main_reward.split("/")[1]: f"{m[main_reward]:.4f}",
                                 "ratio_dev": f"{m['ratio_first_max_dev']:.1e}"})
                bar.update(1)
            done = it + 1
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.iterations:
                self.checkpoint(done)
        if bar is not None:
            bar.close()
        if cfg.export_final:
            self.export(self.out / "final")
        for w in self._writers.values():
            if hasattr(w, "close"):
                w.close()
        return history


