"""The lab world's base generator: a tiny ``diffusers.FluxTransformer2DModel`` and a learned
prompt encoder, pretrained with rectified flow matching on the digits' train split.

The digit image itself is the latent (``[B, 1, S, S]`` in [-1, 1], no VAE), packed 2x2
into ``(S/2)^2`` tokens of 4 channels exactly like Flux latents. The model is deliberately
under-trained (``pretrain_steps``) so that RL has headroom, and deterministic given the
seed. Saved in diffusers' layout::

    DIR/transformer/{config.json, diffusion_pytorch_model.safetensors}   (save_pretrained)
    DIR/text_encoder/{config.json, model.safetensors}
    DIR/lab_world.json                                                   (LabWorldConfig)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

from ..hub import dtype_kwarg
from ..models.flux import FluxVelocity, FluxVelocityAdapter, pack_latents, unpack_latents
from .data import load_splits, to_unit
from .prompts import LabTextEncoder, class_prompts

__all__ = ["LabWorldConfig", "LabPolicy", "build_base_model", "load_lab_policy", "pretrain_flow"]


@dataclass(frozen=True)
class LabWorldConfig:
    """Everything that determines the base model (a different config is a different model)."""

    seed: int = 0
    image_size: int = 8
    pretrain_steps: int = 150
    batch_size: int = 128
    lr: float = 2e-3
    train_shift: float = 3.0
    num_layers: int = 1
    num_single_layers: int = 1
    num_attention_heads: int = 4
    attention_head_dim: int = 16
    text_dim: int = 32

    def transformer_kwargs(self) -> dict:
        return dict(patch_size=1, in_channels=4, num_layers=self.num_layers,
                    num_single_layers=self.num_single_layers, attention_head_dim=self.attention_head_dim,
                    num_attention_heads=self.num_attention_heads, joint_attention_dim=self.text_dim,
                    pooled_projection_dim=self.text_dim, guidance_embeds=False, axes_dims_rope=(4, 6, 6))


class LabPolicy(FluxVelocityAdapter):
    """The lab generator behind the engine protocol, with the adapter methods of a real policy.

    ``encode_prompts(list[str]) -> cond`` (cached per prompt while the encoder is frozen),
    ``prepare_latents(n, generator) -> [n, N, 4C]`` packed noise, ``__call__(x, sigma, cond)``,
    ``decode(latents) -> images [n, 1, S, S]`` in [0, 1]. The latent is the image itself, packed 2x2 as Flux
    packs. ``marker`` is the file its folder is known by.
    """

    marker = "lab_world.json"

    def __init__(self, transformer: FluxTransformer2DModel, text_encoder: LabTextEncoder, config) -> None:
        super().__init__(None, config.image_size, config.image_size, None, 0)
        self.config = config
        self.size = config.image_size
        self.velocity = FluxVelocity(transformer, *self._token_grid(), guidance_scale=None)
        self.text_encoder = text_encoder

    def _token_grid(self) -> tuple[int, int]:
        """The ``(height, width)`` of the latent whose 2x2 packing gives the transformer's tokens (RoPE ids)."""
        return self.size, self.size

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> LabPolicy:
        """A lab model folder (the registry's ``default_path`` builds the default world)."""
        return load_lab_policy(path, dtype)

    @property
    def latent_shape(self) -> tuple[int, int]:
        return ((self.size // 2) ** 2, self.transformer.config.in_channels)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[n, 1, S, S]`` in [-1, 1] -> packed latents (the inverse of :meth:`decode` but for the [0, 1]
        scaling)."""
        return pack_latents(images)

    def encode_batch(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self.text_encoder(prompts)

    def prepare_latents(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return self.randn((n, *self.latent_shape), generator, device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return to_unit(unpack_latents(latents.float(), self.size, self.size))

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(folder / "transformer")
        self.text_encoder.save_pretrained(folder / "text_encoder")
        (folder / self.marker).write_text(json.dumps(asdict(self.config), indent=1))


def pretrain_flow(policy: LabPolicy, steps: int, lr: float, train_shift: float,
                  batch: Callable[[torch.Generator], tuple[torch.Tensor, list[str]]], seed: int, log=None,
                  cosine: bool = False, ema: float | None = None) -> LabPolicy:
    """Rectified flow matching of ``policy`` (transformer and text encoder) on ``batch(generator) -> (clean
    latents [B, N, C], prompts)``, the noise level drawn with the sampling schedule's density (shift
    ``train_shift``); deterministic given ``seed``. ``cosine``: the learning rate decays to 0 along a cosine
    (after a 5% linear warm-up); ``ema``: the policy ends with the exponential moving average of its weights
    (that decay per step)."""
    params = list(policy.transformer.parameters()) + list(policy.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = None
    if cosine:
        warm = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (
            1 + math.cos(math.pi * min(i, steps) / steps)))
    average = [p.detach().clone() for p in params] if ema is not None else None
    g = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        x0, prompts = batch(g)
        n = x0.shape[0]
        u = torch.rand(n, generator=g)
        t = train_shift * u / (1 + (train_shift - 1) * u)  # the sampling schedule's density
        eps = torch.randn(x0.shape, generator=g)
        xt = (1 - t)[:, None, None] * x0 + t[:, None, None] * eps
        loss = ((policy(xt, t, policy.text_encoder(prompts)) - (eps - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if average is not None:
            with torch.no_grad():
                torch._foreach_lerp_(average, [p.detach() for p in params], 1.0 - ema)
        if log is not None and (step % 50 == 0 or step == steps - 1):
            log(f"pretrain step {step:4d}  flow-matching loss {loss.item():.4f}")
    if average is not None:
        with torch.no_grad():
            for p, a in zip(params, average):
                p.copy_(a)
    return policy.eval()


def build_base_model(config: LabWorldConfig = LabWorldConfig(), log=None) -> LabPolicy:
    """Pretrain the base generator with rectified flow matching (deterministic given the seed)."""
    torch.manual_seed(config.seed)
    splits = load_splits(config.seed, config.image_size)
    transformer = FluxTransformer2DModel(**config.transformer_kwargs())
    all_prompts = [p for label in range(10) for p in class_prompts(label)]
    encoder = LabTextEncoder.from_prompts(all_prompts, dim=config.text_dim, pooled_dim=config.text_dim)
    policy = LabPolicy(transformer, encoder, config)
    x_all, y_all = splits.train_x, splits.train_y
    n_para = len(class_prompts(0))

    def batch(g: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        idx = torch.randint(0, len(y_all), (config.batch_size,), generator=g)
        which = torch.randint(0, n_para, (config.batch_size,), generator=g).tolist()
        prompts = [class_prompts(int(label))[w] for label, w in zip(y_all[idx].tolist(), which)]
        return policy.encode_images(x_all[idx][:, None]), prompts

    return pretrain_flow(policy, config.pretrain_steps, config.lr, config.train_shift, batch, config.seed, log)


def load_lab_policy(folder: str | Path, dtype: torch.dtype = torch.float32) -> LabPolicy:
    """Load a lab policy (base model or a trained checkpoint) from its diffusers-layout folder."""
    folder = Path(folder)
    cfg_file = folder / "lab_world.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{folder} is not a lab model folder: missing {cfg_file.name} "
                                "(build one with `python -m g2rpo.lab build`)")
    config = LabWorldConfig(**json.loads(cfg_file.read_text()))
    if not (folder / "transformer" / "config.json").is_file():
        raise FileNotFoundError(f"missing {folder / 'transformer' / 'config.json'}")
    transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer", **dtype_kwarg(dtype))
    encoder = LabTextEncoder.from_pretrained(folder / "text_encoder")
    return LabPolicy(transformer, encoder, config).eval()
