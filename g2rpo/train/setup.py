"""What the trainer trains: the policy (dtype, LoRA, gradient checkpointing, attention backend,
FSDP2), the frozen reference for the KL term, the optimiser, its LR schedule and the EMA.

Mixed precision: ``model.dtype`` is the *compute* dtype. Trained weights are fp32 masters (an lr
of 2e-6 is below bf16's resolution: bf16 weights would not move); bf16 compute comes from FSDP2's
MixedPrecisionPolicy across ranks and from autocast in any case. Frozen parts (VAE, text encoders,
LoRA base weights) stay in ``model.dtype``. The policy's inputs (latents, text, timestep) are cast
to ``model.dtype`` in rollout and training alike.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, TrainConfig
from ..distributed import DistContext, shard_module
from ..models.loading import TORCH_DTYPES, load_configured_policy
from ..models.registry import family, import_path
from ..rollout.configured import check_strategy_schedule

__all__ = ["EXPORT_MARKER", "PolicySetup", "build_policy", "build_optimizer", "lr_lambda", "autocast",
           "reference_policy", "resolve_trained_experts", "run_schedule", "schedule_sigmas", "update_ema", "ema_decay_at",
           "export_is_current", "export_policy", "seed_of"]


@dataclass
class PolicySetup:
    policy: torch.nn.Module  # the velocity model + encode_prompts / prepare_latents / decode
    module: torch.nn.Module  # the trained transformer (FSDP2-sharded across ranks)
    base_path: Path
    compute_dtype: torch.dtype
    ref_module: torch.nn.Module | None  # the frozen initial transformer (KL without LoRA)
    params: list[torch.nn.Parameter]


def build_policy(cfg: TrainConfig, ctx: DistContext, log=print, prompt_images: dict | None = None) -> PolicySetup:
    """The policy, its trained module (sharded across ranks), the reference for the KL term and the trained
    parameters; an image-to-video policy gets ``prompt_images`` (checked by :func:`.rundir.preflight`)."""
    loaded = load_configured_policy(cfg.model, log=log)
    policy = loaded.policy.to(ctx.device)
    policy.requires_grad_(False)
    try:
        resolve_trained_experts(cfg, policy, log=log if ctx.is_main else lambda *a, **k: None)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if prompt_images is not None:  # image-to-video: each prompt's conditioning image
        policy.set_prompt_images(prompt_images)
    module = policy.transformer
    dtype = TORCH_DTYPES[cfg.model.dtype]
    policy.compute_dtype = dtype  # the same input dtypes (timestep too) in rollout and training
    policy.noise_dtype = TORCH_DTYPES[cfg.sampler.noise_dtype]
    policy.detach_uncond = cfg.model.cfg_detach_uncond
    policy.integer_timesteps = cfg.sampler.quantize_timesteps
    if not cfg.lora.enabled and dtype != torch.float32:
        module.to(torch.float32)
    if cfg.lora.enabled:
        from peft import LoraConfig

        module.add_adapter(LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
                                      target_modules=list(cfg.lora.target_modules), init_lora_weights="gaussian"))
    else:
        module.requires_grad_(True)
    if cfg.model.gradient_checkpointing:
        module.enable_gradient_checkpointing()
    if cfg.model.attention_backend:
        try:  # diffusers checks that the backend's package (flash-attn, ...) is installed
            module.set_attention_backend(cfg.model.attention_backend)
        except (ValueError, RuntimeError, ImportError) as err:
            raise ConfigError(f"model.attention_backend={cfg.model.attention_backend!r}: {err}") from None
    ref = copy.deepcopy(module).eval().requires_grad_(False) if cfg.loss.kl_beta > 0 and not cfg.lora.enabled else None
    if ctx.enabled:
        shard_module(module, policy.shard_blocks(), ctx.device,
                     param_dtype=None if dtype == torch.float32 else dtype)
    params = [p for p in module.parameters() if p.requires_grad]
    return PolicySetup(policy, module, loaded.path, dtype, ref, params)


def resolve_trained_experts(cfg: TrainConfig, policy, log=print) -> tuple[str, ...]:
    """Set and return the experts ``policy`` trains: its one transformer, or as the family's ``plan_experts`` hook
    decides from the config (Wan 2.2's two experts); logs which, and the SDE steps each owns, for several."""
    fam, names = family(cfg.model.kind), policy.expert_names()
    if fam.plan_experts is None:
        trained, by = names, {}
    else:
        trained, by = import_path(fam.plan_experts)(cfg, names, policy.expert_of_sigma)
    policy.set_trained_experts(trained)
    if len(names) > 1:
        log(f"experts: trained {', '.join(trained)}; SDE steps by expert: " + "; ".join(f"{n} {by[n]}" for n in names))
    return trained


def seed_of(*parts: int) -> int:
    """A 63-bit seed derived from integers (run seed, iteration, prompt position, purpose)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def lr_lambda(cfg: TrainConfig):
    """The LR multiplier per iteration: linear warm-up, then constant, linear or cosine decay."""
    warm, total, kind = cfg.optim.warmup_iterations, cfg.iterations, cfg.optim.schedule

    def fn(it: int) -> float:
        if warm and it < warm:
            return (it + 1) / warm
        if kind == "constant":
            return 1.0
        frac = min(1.0, (it - warm) / max(1, total - warm))
        return 1.0 - frac if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))

    return fn


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]):
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def apply_lr(cfg: TrainConfig, scheduler) -> None:
    """After a resume: the configured lr and schedule from the restored iteration on."""
    scheduler.base_lrs = [cfg.optim.lr for _ in scheduler.base_lrs]
    scheduler.lr_lambdas = [lr_lambda(cfg) for _ in scheduler.lr_lambdas]
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


def autocast(device: torch.device, dtype: torch.dtype):
    """Compute in ``dtype`` (no-op for float32)."""
    if dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def reference_policy(setup: PolicySetup, lora: bool):
    """Run the policy as the frozen reference: LoRA adapters off, or the saved initial transformer."""
    with torch.no_grad():
        if lora:
            setup.module.disable_adapters()
            try:
                yield
            finally:
                setup.module.enable_adapters()
        else:
            saved = setup.policy.transformer
            setup.policy.set_transformer(setup.ref_module)
            try:
                yield
            finally:
                setup.policy.set_transformer(saved)


def schedule_sigmas(cfg: TrainConfig, policy, num_steps: int) -> torch.Tensor:
    """The ``num_steps + 1`` sigmas of the run's schedule (``sampler.schedule``): the family pipeline's own default
    sigmas, or the static shift (``sampler.shift``; with ``sampler.dynamic_shift`` the pipeline's exp(mu) for this
    image size). The training rollouts and validation during training both sample on it."""
    from ..schedule import sigma_schedule

    s = cfg.sampler
    if s.resolved_schedule(cfg.model.kind) == "pipeline":
        try:
            return policy.pipeline_sigmas(num_steps)
        except (ValueError, NotImplementedError) as err:
            raise ConfigError(f"sampler.schedule: pipeline: {err}") from None
    if not s.dynamic_shift:
        return sigma_schedule(num_steps, s.static_shift, s.schedule_precision)
    try:
        shift = policy.dynamic_shift()
    except (ValueError, NotImplementedError) as err:
        raise ConfigError(f"sampler.dynamic_shift: {err}") from None
    return sigma_schedule(num_steps, shift, s.schedule_precision)


def run_schedule(cfg: TrainConfig, policy, strategy, log=print) -> torch.Tensor:
    """The run's schedule at the strategy's T (:func:`schedule_sigmas`), logged and, where the config could not
    check it (the pipeline's, a dynamic shift), checked against eta as the config checks its own static one."""
    s, T = cfg.sampler, strategy.num_steps
    sig = schedule_sigmas(cfg, policy, T)
    if s.resolved_schedule(cfg.model.kind) == "pipeline":
        log(f"sampler.schedule: the pipeline's own ({T} steps: sigma {float(sig[1]):.4f} after the first "
            f"step, {float(sig[-2]):.4f} before the last)")
    elif s.dynamic_shift:
        log(f"sampler.dynamic_shift: shift {policy.dynamic_shift():.4f} for {policy.image_seq_len} image tokens")
    else:
        return sig  # checked by the config
    check_strategy_schedule(strategy, sig)
    return sig


def ema_decay_at(cfg: TrainConfig, step: int) -> float | None:
    """The EMA decay after optimizer step ``step`` (1-based), or None when the EMA does not update then:
    every ``ema_every``-th step; ``flow_grpo``: Flow-GRPO's EMAModuleWrapper, ``ema.step(params, s)`` with ``s`` the
    optimizer steps done, updating when ``(s + 1) % ema_every == 0`` at decay ``min((1 + s) / (10 + s),
    ema_decay)`` (it warms the average up over its first steps). ``ema_repeats`` updates toward the same weights
    are one at the decay to that power (Flow-GRPO calls ``ema.step`` once per sample micro-batch)."""
    if cfg.ema_decay is None:
        return None
    if cfg.ema_schedule == "flow_grpo":
        if (step + 1) % cfg.ema_every:
            return None
        decay = min((1 + step) / (10 + step), cfg.ema_decay)
    elif step % cfg.ema_every:
        return None
    else:
        decay = cfg.ema_decay
    return decay ** cfg.ema_repeats


@torch.no_grad()
def update_ema(ema: dict[str, torch.Tensor] | None, module: torch.nn.Module, decay: float | None) -> None:
    if ema is None or decay is None:
        return
    for n, p in module.named_parameters():
        if n in ema:
            ema[n].lerp_(p.detach().float(), 1.0 - decay)


#: Written last into an export folder: what it holds (the trained iteration, EMA or not).
EXPORT_MARKER = "g2rpo_export.json"


def export_is_current(folder: Path, iteration: int) -> bool:
    """Whether ``folder`` holds a complete export of the policy after ``iteration`` iterations."""
    import json

    marker = Path(folder) / EXPORT_MARKER
    try:
        return json.loads(marker.read_text()).get("iteration") == iteration
    except (OSError, ValueError):
        return False


def export_policy(cfg: TrainConfig, ctx: DistContext, module: torch.nn.Module, ema: dict[str, torch.Tensor] | None,
                  base_path: Path, folder: Path, iteration: int | None = None) -> Path:
    """The trained policy in diffusers' ``save_pretrained`` layout: the full (unsharded) state, EMA weights
    when enabled, LoRA fused; the lab world's reward weights are copied along. With LoRA, the adapter
    alone is also saved beside it in ``<folder>_lora/`` (diffusers' ``save_lora_weights`` format, loadable
    with ``pipe.load_lora_weights``). Each folder is written to a temporary name and renamed into place
    when complete (``g2rpo_export.json`` last), so a failed export never leaves a half-written one."""
    import json
    import shutil

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ema is not None:
        for n, t in ema.items():
            full[n] = (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu()
    if ctx.is_main:
        folder = Path(folder)
        fresh = load_configured_policy(cfg.model, log=lambda *a, **k: None).policy
        resolve_trained_experts(cfg, fresh, log=lambda *a, **k: None)
        adapters = {}  # pipeline component -> (LoRA state, its config)
        if cfg.lora.enabled:
            from peft import LoraConfig
            from peft.utils import get_peft_model_state_dict

            fresh.transformer.add_adapter(LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
                                                     target_modules=list(cfg.lora.target_modules)))
        fresh.transformer.load_state_dict(full, strict=True)
        if cfg.lora.enabled:
            for component, lora_module in fresh.lora_modules().items():
                adapters[component] = (get_peft_model_state_dict(lora_module),
                                       lora_module.peft_config["default"].to_dict())
                lora_module.fuse_lora()
                lora_module.unload_lora()
        marker = {"iteration": iteration, "ema": ema is not None, "lora_fused": cfg.lora.enabled}

        def write(target: Path, fill) -> None:
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                fill(tmp)
                (tmp / EXPORT_MARKER).write_text(json.dumps(marker))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written export behind
                raise
            if target.is_dir():
                shutil.rmtree(target)
            tmp.rename(target)

        def fill_model(tmp: Path) -> None:
            fresh.save_pretrained(tmp)
            rewards = base_path / "rewards"
            if rewards.is_dir():
                shutil.copytree(rewards, tmp / "rewards")

        write(folder, fill_model)
        pipe_cls = family(cfg.model.kind).lora_pipeline_class()
        for component, adapter in adapters.items():
            write(folder.with_name(folder.name + fresh.lora_folder_suffix(component)), lambda tmp, adapter=adapter: pipe_cls.save_lora_weights(
                tmp, transformer_lora_layers=adapter[0], transformer_lora_adapter_metadata=adapter[1]))
    ctx.barrier()
    return folder
