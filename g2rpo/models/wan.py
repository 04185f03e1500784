"""Wan text-to-video adapters (diffusers' ``WanTransformer3DModel``) behind the engine protocol: Wan 2.1, Wan 2.2
A14B (two experts) and Wan 2.2 TI2V-5B (``expand_timesteps``).

Latents are the pipeline's ``[B, C, F', h, w]`` video latents (``F' = (frames - 1) / t + 1`` for the VAE's
temporal factor t, ``h, w`` = height, width / spatial factor). The transformer takes ``timestep = 1000 *
sigma``: continuous by default; with ``integer_timesteps`` (the trainer sets it from
``sampler.quantize_timesteps``) the integer ``int(sigma * 1000)``, as DanceGRPO's Wan trainer feeds it (the
engine then passes ``int(sigma * 1000) / 1000``, rounded back to that integer here). Guidance is classifier-free as in
the pipeline (``guidance_scale > 1``: the prompt and the negative prompt, combined as
``v_neg + g (v_pos - v_neg)``), here in one doubled batch. ``decode`` returns videos
``[B, 3, F, H, W]`` in [0, 1] (the VAE's ``latents_mean`` / ``latents_std`` undone first).

Wan 2.2 A14B (a pipeline with ``transformer_2`` and ``boundary_ratio``): as ``WanPipeline.__call__``,
``transformer`` predicts at timesteps ``>= boundary_ratio * num_train_timesteps`` (high noise) with
``guidance_scale`` and ``transformer_2`` below (low noise) with ``guidance_scale_2`` (default: the same). A batch
of rows at several noise levels runs each expert on its own rows. Both experts live in one :class:`WanExperts`
module (what the trainer shards, checkpoints and exports); :meth:`WanPolicy.set_trained_experts` picks the trained
one(s), the other stays frozen. Wan 2.2 TI2V-5B (``expand_timesteps``): the timestep is given per latent token,
``[B, F' * h/2 * w/2]``, as the pipeline expands it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ..hub import dtype_kwarg
from ._vae import checked_folder, decode_in_chunks, latent_stats
from .base import PolicyAdapter

__all__ = ["EXPERTS", "WanExperts", "WanPolicy", "expert_for", "experts_of_folder", "load_wan_policy",
           "plan_trained_experts"]

#: Wan 2.2 A14B's experts by their pipeline component names: high noise, low noise.
EXPERTS = ("transformer", "transformer_2")


def expert_for(sigma: float, boundary: float, integer_timesteps: bool = False) -> str:
    """The expert ``WanPipeline`` runs at noise level ``sigma``: ``transformer`` when the timestep (``1000 sigma``
    in fp32, rounded when the model is fed integers) is ``>= boundary``, else ``transformer_2``."""
    t = float(torch.tensor(float(sigma), dtype=torch.float32) * 1000.0)
    if integer_timesteps:
        t = float(round(t))
    return EXPERTS[0] if t >= boundary else EXPERTS[1]


#: model.train_experts aliases by noise level.
EXPERT_ALIASES = {"high": "transformer", "low": "transformer_2"}


def plan_trained_experts(cfg, names: tuple[str, ...], expert_of_sigma) -> tuple[tuple[str, ...], dict[str, list[int]]]:
    """``(trained experts, {expert: SDE steps it owns})`` for a :class:`TrainConfig` (``model.train_experts``) and a
    model with experts ``names`` routed by ``expert_of_sigma(sigma)``: ``auto`` takes those that own the SDE steps
    the strategy can train over the run (their sigma as the model sees it). A trained SDE step owned by a frozen
    expert raises ValueError: no gradient could reach it. A one-transformer model trains it."""
    from ..rollout.configured import strategy_from_config
    from ..schedule import model_timesteps, sigma_schedule

    choice = EXPERT_ALIASES.get(cfg.model.train_experts, cfg.model.train_experts)
    if len(names) == 1:
        if choice not in ("auto", "both", names[0]):
            raise ValueError(f"model.train_experts={cfg.model.train_experts}: this model has one transformer")
        return names, {}
    s = cfg.sampler
    strategy = strategy_from_config(s)
    steps = sorted({e for it in range(cfg.iterations) for e in strategy.sde_steps(it)})
    sig = sigma_schedule(s.num_steps, s.static_shift, s.schedule_precision)  # multi-expert families: the shift schedule
    seen = model_timesteps(sig, s.quantize_timesteps)  # the noise level the model is given (and routed by)
    owner = {e: expert_of_sigma(float(seen[e])) for e in steps}
    trained = (tuple(n for n in names if n in owner.values()) if choice == "auto"
               else names if choice == "both" else (choice,))
    frozen = {e: o for e, o in owner.items() if o not in trained}
    if frozen:
        raise ValueError(f"model.train_experts={cfg.model.train_experts}: the SDE steps {sorted(frozen)} (sigma "
                         f"{', '.join(f'{float(sig[e]):.3f}' for e in sorted(frozen))}) are predicted by the frozen "
                         f"{', '.join(sorted(set(frozen.values())))}; train it too (auto or both) or keep sampler."
                         f"sde_indices on {', '.join(trained)}")
    return trained, {n: [e for e in steps if owner[e] == n] for n in names}


def experts_of_folder(folder) -> tuple[tuple[str, ...], Callable[[float, bool], str]] | None:
    """From a diffusers Wan folder's files alone (before any model loads): ``(EXPERTS, route(sigma,
    integer_timesteps))`` when it holds two experts split at ``boundary_ratio x num_train_timesteps``, else None."""
    import json
    from pathlib import Path

    folder = Path(folder)
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    second = index.get("transformer_2")
    if index.get("boundary_ratio") is None or not isinstance(second, list) or second[0] is None:
        return None
    try:
        steps = json.loads((folder / "scheduler" / "scheduler_config.json").read_text()).get("num_train_timesteps", 1000)
    except (OSError, ValueError):
        steps = 1000  # FlowMatchEulerDiscreteScheduler's default
    boundary = float(index["boundary_ratio"]) * steps
    return EXPERTS, lambda sigma, integer=False: expert_for(sigma, boundary, integer)


class WanExperts(torch.nn.Module):
    """Wan 2.2's two experts as one module: ``transformer`` (timesteps ``>= boundary``) and ``transformer_2``.
    ``forward(expert=name, **inputs)`` runs one expert (through this module, so that FSDP2's root hooks gather its
    unsharded parameters); only the ``trained`` experts ever require gradients or take LoRA adapters."""

    def __init__(self, transformer: torch.nn.Module, transformer_2: torch.nn.Module, boundary: float) -> None:
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.boundary = float(boundary)
        self.trained: tuple[str, ...] = EXPERTS

    @property
    def config(self):
        return self.transformer.config

    @property
    def blocks(self) -> list[torch.nn.Module]:
        """Both experts' transformer blocks (FSDP2 shards each)."""
        return [*self.transformer.blocks, *self.transformer_2.blocks]

    def expert(self, name: str) -> torch.nn.Module:
        if name not in EXPERTS:
            raise ValueError(f"unknown Wan 2.2 expert {name!r}; the experts are {EXPERTS}")
        return getattr(self, name)

    def forward(self, expert: str, **inputs):
        return self.expert(expert)(**inputs)

    def requires_grad_(self, requires_grad: bool = True) -> WanExperts:
        """Only the trained experts follow ``requires_grad``; the others stay frozen."""
        for name in EXPERTS:
            self.expert(name).requires_grad_(requires_grad and name in self.trained)
        return self

    def add_adapter(self, config, **kwargs) -> None:
        """LoRA on the trained experts only."""
        for name in self.trained:
            self.expert(name).add_adapter(config, **kwargs)

    def enable_gradient_checkpointing(self) -> None:
        for name in EXPERTS:
            self.expert(name).enable_gradient_checkpointing()

    def set_attention_backend(self, backend: str) -> None:
        for name in EXPERTS:
            self.expert(name).set_attention_backend(backend)


class WanPolicy(PolicyAdapter):
    """``model(x [B, C, F', h, w], sigma [B], cond) -> velocity`` (fp32 out), with ``encode_prompts``,
    ``prepare_latents`` (as ``WanPipeline.prepare_latents`` draws them) and ``decode`` (videos)."""

    def __init__(self, pipe, height: int, width: int, num_frames: int, guidance_scale: float,
                 max_sequence_length: int, negative_prompt: str = "", guidance_scale_2: float | None = None) -> None:
        super().__init__(pipe, height, width, guidance_scale, max_sequence_length)
        s, t = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        if height % s or width % s:
            raise ValueError(f"height and width must be multiples of {s} for this VAE, got {height}x{width}")
        if (num_frames - 1) % t:
            raise ValueError(f"num_frames - 1 must be a multiple of {t} for this VAE, got {num_frames}")
        config = pipe.config
        boundary_ratio = config.get("boundary_ratio")
        two = pipe.transformer_2 is not None and boundary_ratio is not None  # the pipeline uses transformer_2
        if pipe.transformer_2 is not None and boundary_ratio is None:
            raise ValueError("this Wan pipeline has a transformer_2 but no boundary_ratio: WanPipeline would never "
                             "use it; set boundary_ratio in model_index.json (Wan 2.2 A14B: 0.875 text-to-video, "
                             "0.9 image-to-video) or remove transformer_2")
        if guidance_scale_2 is not None and not two:
            raise ValueError("guidance_scale_2 is the low-noise expert's guidance: this Wan pipeline has one "
                             "transformer (no transformer_2 with a boundary_ratio)")
        self.guidance_scale_2 = guidance_scale if guidance_scale_2 is None else guidance_scale_2
        self.expand_timesteps = bool(config.get("expand_timesteps", False))
        self.num_frames = num_frames
        self.latent_channels = pipe.vae.config.z_dim
        self.latent_shape = (self.latent_channels, (num_frames - 1) // t + 1, height // s, width // s)
        self.negative_prompt = negative_prompt
        if two:
            boundary = float(boundary_ratio) * pipe.scheduler.config.num_train_timesteps
            self.transformer = WanExperts(pipe.transformer, pipe.transformer_2, boundary)
        else:
            self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.bfloat16, **settings) -> WanPolicy:
        """Wan text-to-video from a local diffusers ``WanPipeline`` folder."""
        from diffusers import WanPipeline

        pipe = WanPipeline.from_pretrained(checked_folder(path, "wan"), **dtype_kwarg(dtype))
        pipe.vae.to(torch.float32)  # the pipeline decodes in the VAE's dtype; Wan's VAE is kept in fp32
        return cls(pipe, **settings)

    # ---- experts -----------------------------------------------------------------------------------
    @property
    def experts(self) -> WanExperts | None:
        """Wan 2.2 A14B's two experts (None: one transformer)."""
        return self.transformer if isinstance(self.transformer, WanExperts) else None

    def expert_names(self) -> tuple[str, ...]:
        return EXPERTS if self.experts is not None else ("transformer",)

    def expert_of_sigma(self, sigma: float) -> str:
        """As ``WanPipeline``: ``transformer`` at timesteps ``1000 sigma >= boundary``, else ``transformer_2``."""
        if self.experts is None:
            return "transformer"
        return expert_for(sigma, self.experts.boundary, self.integer_timesteps)

    def set_trained_experts(self, names: Sequence[str]) -> None:
        names = tuple(dict.fromkeys(names))
        if self.experts is None:
            return super().set_trained_experts(names)
        wrong = [n for n in names if n not in EXPERTS]
        if wrong or not names:
            raise ValueError(f"Wan 2.2 experts to train must be among {EXPERTS}, got {list(names)}")
        self.experts.trained = tuple(n for n in EXPERTS if n in names)

    def load_transformers(self, folder, dtype: torch.dtype) -> torch.nn.Module:
        if self.experts is None:
            return super().load_transformers(folder, dtype)
        from pathlib import Path

        cls = type(self.experts.transformer)
        loaded = [cls.from_pretrained(Path(folder) / name, **dtype_kwarg(dtype)) for name in EXPERTS]
        experts = WanExperts(*loaded, self.experts.boundary)
        experts.trained = self.experts.trained
        return experts

    def lora_modules(self) -> dict[str, torch.nn.Module]:
        if self.experts is None:
            return super().lora_modules()
        return {n: self.experts.expert(n) for n in self.experts.trained}

    def lora_folder_suffix(self, component: str) -> str:
        """Wan 2.2's ``transformer_2`` adapter goes to ``<export>_lora_transformer_2`` (diffusers loads it with
        ``pipe.load_lora_weights(..., load_into_transformer_2=True)``)."""
        return "_lora" if component == "transformer" else f"_lora_{component}"

    def shard_blocks(self) -> list[torch.nn.Module]:
        """Wan's transformer ``blocks`` (both experts' with Wan 2.2 A14B)."""
        return list(self.transformer.blocks)

    # ---- the velocity --------------------------------------------------------------------------------
    def model_input(self, x: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """What the transformer takes as ``hidden_states`` for latents ``x`` (image-to-video adds its condition)."""
        return x

    def model_timestep(self, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The timestep input: ``[B]``, or per token ``[B, F' * h/2 * w/2]`` with ``expand_timesteps``."""
        if not self.expand_timesteps:
            return t
        _, f, h, w = self.latent_shape
        return t[:, None].expand(t.shape[0], f * (h // 2) * (w // 2))

    def transformer_kwargs(self, cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Extra transformer inputs taken from ``cond`` (image-to-video: the image embedding)."""
        return {}

    @property
    def transformer_rows_per_row(self) -> int:
        return 2 if self.classifier_free_on else 1  # the conditional and unconditional rows in one doubled batch

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        t = (sigma.float() * 1000.0).to(device=x.device)
        if self.integer_timesteps:
            t = torch.round(t)
        experts = self.experts
        if experts is None:
            return self._velocity(x, t, cond, None, self.guidance_scale)
        high = t >= experts.boundary
        out = None
        for name, rows, scale in ((EXPERTS[0], high, self.guidance_scale), (EXPERTS[1], ~high, self.guidance_scale_2)):
            if not bool(rows.any()):
                continue
            if bool(rows.all()):
                return self._velocity(x, t, cond, name, scale)
            idx = rows.nonzero().squeeze(1)
            v = self._velocity(x[idx], t[idx], {k: c[idx] for k, c in cond.items()}, name, scale)
            out = (v.new_zeros(x.shape) if out is None else out).index_copy(0, idx, v)
        return out

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor], expert: str | None,
                  scale: float) -> torch.Tensor:
        dtype = self.dtype
        route = {} if expert is None else {"expert": expert}
        extra = {k: v.to(dtype) for k, v in self.transformer_kwargs(cond).items()}
        hidden = self.model_input(x, cond).to(dtype)
        timestep = self.model_timestep(t, cond)
        text = cond["prompt_embeds"]
        if self.classifier_free_on:
            both = torch.cat([cond["negative_prompt_embeds"], text]).to(dtype)
            extra2 = {k: torch.cat([v, v]) for k, v in extra.items()}
            return self.classifier_free(lambda xx, tt: self.transformer(
                hidden_states=xx, timestep=tt, encoder_hidden_states=both, return_dict=False, **route,
                **extra2)[0], hidden, timestep, scale)[0]
        return self.transformer(hidden_states=hidden, timestep=timestep, encoder_hidden_states=text.to(dtype),
                                return_dict=False, **route, **extra)[0].float()

    # ---- prompts, latents, videos ------------------------------------------------------------------------
    def encode_batch(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        pe, npe = self._pipe.encode_prompt(prompt=prompts, negative_prompt=[self.negative_prompt] * len(prompts),
                                           do_classifier_free_guidance=self.classifier_free_on, num_videos_per_prompt=1,
                                           max_sequence_length=self.max_sequence_length,
                                           device=self.text_device(self.text_encoder))
        return {"prompt_embeds": pe, **({"negative_prompt_embeds": npe} if self.classifier_free_on else {})}

    def prepare_latents(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return self.randn((n, *self.latent_shape), generator, device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int = 2) -> torch.Tensor:
        mean, std = latent_stats(self.vae)
        return decode_in_chunks(self.vae, latents, batch, lambda z: z * std.to(z.device) + mean.to(z.device))

    def save_pretrained(self, folder) -> None:
        """The pipeline's layout with the current transformer(s) (both experts for Wan 2.2 A14B)."""
        if self.experts is None:
            return super().save_pretrained(folder)
        self._pipe.transformer = self.experts.transformer
        self._pipe.transformer_2 = self.experts.transformer_2
        self._pipe.save_pretrained(folder)


def load_wan_policy(path, dtype: torch.dtype = torch.bfloat16, **settings) -> WanPolicy:
    """Wan text-to-video from a local diffusers folder; unset settings take the family's defaults."""
    from .registry import load_family

    return load_family("wan", path, dtype, **settings)
