"""Stable Diffusion 3 / 3.5 adapter (diffusers' ``SD3Transformer2DModel``) behind the engine protocol.

Latents stay unpacked ``[B, 16, h, w]``. The transformer takes ``timestep = 1000 * sigma``
(as ``StableDiffusion3Pipeline`` feeds the scheduler's timesteps). Guidance is classifier-free
as in the pipeline: with ``guidance_scale > 1`` every row is evaluated with the prompt and
with the negative (empty by default) prompt in one doubled batch and combined as
``v_neg + g * (v_pos - v_neg)``; the conditioning then carries both embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline

from ._cache import PromptEmbeddingCache
from ..model_files import MODEL_FILES, require_files
from ._vae import decode_in_chunks

__all__ = ["SD3Policy", "load_sd3_policy"]


class SD3Policy(torch.nn.Module):
    def __init__(self, pipe: StableDiffusion3Pipeline, height: int = 512, width: int = 512,
                 guidance_scale: float = 4.5, max_sequence_length: int = 256, negative_prompt: str = "") -> None:
        super().__init__()
        f = pipe.vae_scale_factor
        if height % (f * pipe.transformer.config.patch_size) or width % (f * pipe.transformer.config.patch_size):
            raise ValueError(f"height and width must be multiples of {f * pipe.transformer.config.patch_size}")
        self.height, self.width = height, width
        self.latent_height, self.latent_width = height // f, width // f
        self.guidance_scale, self.max_sequence_length, self.negative_prompt = (guidance_scale, max_sequence_length,
                                                                               negative_prompt)
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.text_encoders = torch.nn.ModuleList([pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3])
        self._pipe = pipe
        self._cache = PromptEmbeddingCache()
        self.compute_dtype: torch.dtype | None = None  # the inputs' dtype (None: the parameters')

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        dtype = self.compute_dtype or next(self.transformer.parameters()).dtype
        t = (sigma.float() * 1000.0).to(dtype)
        if self.cfg:
            xx = torch.cat([x, x]).to(dtype)
            emb = torch.cat([cond["negative_prompt_embeds"], cond["prompt_embeds"]]).to(dtype)
            pooled = torch.cat([cond["negative_pooled_prompt_embeds"], cond["pooled_prompt_embeds"]]).to(dtype)
            v = self.transformer(hidden_states=xx, timestep=torch.cat([t, t]), encoder_hidden_states=emb,
                                 pooled_projections=pooled, return_dict=False)[0].float()
            v_neg, v_pos = v.chunk(2)
            return v_neg + self.guidance_scale * (v_pos - v_neg)
        v = self.transformer(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                             pooled_projections=cond["pooled_prompt_embeds"].to(dtype), return_dict=False)[0]
        return v.float()

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        def encode(new: list[str]) -> dict[str, torch.Tensor]:
            device = next(self.transformer.parameters()).device
            pe, npe, pp, npp = self._pipe.encode_prompt(
                prompt=new, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
                do_classifier_free_guidance=self.cfg, negative_prompt=[self.negative_prompt] * len(new),
                max_sequence_length=self.max_sequence_length)
            out = {"prompt_embeds": pe, "pooled_prompt_embeds": pp}
            if self.cfg:
                out.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=npp)
            return out

        return self._cache(prompts, encode)

    def prepare_latents(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        c = self.transformer.config.in_channels
        return torch.randn((n, c, self.latent_height, self.latent_width), generator=generator, device=device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int = 8) -> torch.Tensor:
        cfg = self.vae.config
        return decode_in_chunks(self.vae, latents, batch, lambda z: z / cfg.scaling_factor + (cfg.shift_factor or 0.0))

    def save_pretrained(self, folder) -> None:
        self._pipe.save_pretrained(folder)


def load_sd3_policy(path, dtype: torch.dtype = torch.bfloat16, height: int = 512, width: int = 512,
                    guidance_scale: float = 4.5, max_sequence_length: int = 256) -> SD3Policy:
    root = Path(path)
    require_files(root, MODEL_FILES["sd3"], "SD3")
    pipe = StableDiffusion3Pipeline.from_pretrained(root, torch_dtype=dtype)
    return SD3Policy(pipe, height, width, guidance_scale, max_sequence_length)
