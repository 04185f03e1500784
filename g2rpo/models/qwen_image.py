"""Qwen-Image adapter (diffusers' ``QwenImageTransformer2DModel``) behind the engine protocol.

Latents are packed as ``QwenImagePipeline`` packs them (``[B, (h/2)(w/2), 4c]`` from ``[B, 1, c, h, w]``,
the pipeline's own static ``_pack_latents`` / ``_unpack_latents``). The transformer takes ``timestep =
sigma`` (the pipeline divides its timesteps by 1000), ``img_shapes`` and the prompt embeddings with their
mask. Prompts have their own token lengths: each prompt is encoded alone (batch-independent) and padded,
with a mask, to the longest of the rows a call gathers. True CFG as the pipeline does it when
``true_cfg_scale > 1``: ``neg + s (pos - neg)`` rescaled per token to the conditional prediction's norm,
here in one doubled batch (prompt and negative rows padded with masks to one length). ``decode`` returns images ``[B, 3, H, W]`` in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..hub import dtype_kwarg
from ._vae import checked_folder, decode_in_chunks, latent_stats, packed_grid
from .base import PolicyAdapter

__all__ = ["QwenImagePolicy", "load_qwen_image_policy"]


def _pad(rows: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(r.shape[0] for r in rows)
    emb = torch.stack([torch.cat([r, r.new_zeros(L - r.shape[0], r.shape[1])]) for r in rows])
    mask = torch.stack([torch.cat([m, m.new_zeros(L - m.shape[0])]) for m in masks])
    return emb, mask


class QwenImagePolicy(PolicyAdapter):
    """``model(x packed [B, N, 4c], sigma [B], cond) -> velocity`` (fp32 out), with ``encode_prompts``,
    ``prepare_latents`` (as the pipeline draws and packs them) and ``decode``. ``guidance_scale`` is the
    pipeline's ``true_cfg_scale``."""

    def __init__(self, pipe, height: int, width: int, guidance_scale: float, max_sequence_length: int,
                 negative_prompt: str = " ") -> None:
        super().__init__(pipe, height, width, guidance_scale, max_sequence_length)
        gh, gw = packed_grid(pipe.vae_scale_factor, height, width)
        self.latent_height, self.latent_width = 2 * gh, 2 * gw
        self.negative_prompt = negative_prompt
        if pipe.transformer.config.guidance_embeds:
            raise ValueError("guidance-distilled Qwen-Image transformers (guidance_embeds) are not supported")
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder
        self._rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.bfloat16, **settings) -> QwenImagePolicy:
        """Qwen-Image from a local diffusers ``QwenImagePipeline`` folder."""
        from diffusers import QwenImagePipeline

        return cls(QwenImagePipeline.from_pretrained(checked_folder(path, "qwen_image"), **dtype_kwarg(dtype)),
                   **settings)

    @property
    def true_cfg_scale(self) -> float:
        return float(self.guidance_scale)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.z_dim

    @property
    def image_seq_len(self) -> int:
        return (self.latent_height // 2) * (self.latent_width // 2)

    def _embed(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        if prompt not in self._rows:  # one prompt per call: the embedding never depends on the batch
            device = self.text_device(self.text_encoder)
            with torch.no_grad():
                emb, mask = self._pipe.encode_prompt(prompt=[prompt], device=device,
                                                     max_sequence_length=self.max_sequence_length)
            mask = torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device) if mask is None else mask
            self._rows[prompt] = (emb[0].detach(), mask[0])
        return self._rows[prompt]

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each prompt alone (its own token length), padded with a mask to the longest of the call."""
        pos = [self._embed(p) for p in prompts]
        emb, mask = _pad([e for e, _ in pos], [m for _, m in pos])
        out = {"prompt_embeds": emb, "prompt_embeds_mask": mask}
        if self.classifier_free_on:
            neg = self._embed(self.negative_prompt)
            out["negative_prompt_embeds"], out["negative_prompt_embeds_mask"] = _pad([neg[0]] * len(prompts),
                                                                                     [neg[1]] * len(prompts))
        return out

    def _call(self, x, sigma, emb, mask, dtype):
        b = x.shape[0]
        keep = int(mask.sum(dim=1).max())  # drop the columns every gathered row pads
        emb, mask = emb[:, :keep], mask[:, :keep]
        return self.transformer(hidden_states=x.to(dtype), timestep=sigma.to(device=x.device, dtype=dtype),
                                guidance=None, encoder_hidden_states_mask=None if bool(mask.all()) else mask,
                                encoder_hidden_states=emb.to(dtype),
                                img_shapes=[[(1, self.latent_height // 2, self.latent_width // 2)]] * b,
                                return_dict=False)[0].float()

    @property
    def transformer_rows_per_row(self) -> int:
        return 2 if self.classifier_free_on else 1  # the conditional and unconditional rows in one doubled batch

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        dtype = self.dtype
        if not self.classifier_free_on:
            return self._call(x, sigma, cond["prompt_embeds"], cond["prompt_embeds_mask"], dtype)
        # one doubled batch (as SD3): prompt and negative rows padded, with their masks, to one length
        L = max(cond["prompt_embeds"].shape[1], cond["negative_prompt_embeds"].shape[1])

        def widen(e, m):
            return torch.nn.functional.pad(e, (0, 0, 0, L - e.shape[1])), torch.nn.functional.pad(m, (0, L - m.shape[1]))

        pe, pm = widen(cond["prompt_embeds"], cond["prompt_embeds_mask"])
        ne, nm = widen(cond["negative_prompt_embeds"], cond["negative_prompt_embeds_mask"])
        comb, _, pos = self.classifier_free(lambda xx, ss: self._call(xx, ss, torch.cat([ne, pe]), torch.cat([nm, pm]),
                                                                      dtype), x, sigma)
        return comb * (pos.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))

    def prepare_latents(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        c, h, w = self.latent_channels, self.latent_height, self.latent_width
        z = self.randn((n, 1, c, h, w), generator, device)
        return self._pipe._pack_latents(z, n, c, h, w)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int = 4) -> torch.Tensor:
        mean, std = latent_stats(self.vae)
        f = self._pipe.vae_scale_factor

        def to_vae(z):
            z = self._pipe._unpack_latents(z, self.height, self.width, f)  # [B, c, 1, h, w]
            return z * std.to(z.device) + mean.to(z.device)

        return decode_in_chunks(self.vae, latents, batch, to_vae, pick=lambda img: img[:, :, 0])



def load_qwen_image_policy(path, dtype: torch.dtype = torch.bfloat16, **settings) -> QwenImagePolicy:
    """Qwen-Image from a local diffusers folder (``guidance_scale`` is the pipeline's ``true_cfg_scale``);
    unset settings take the family's defaults (models.registry)."""
    from .registry import load_family

    return load_family("qwen_image", path, dtype, **settings)
