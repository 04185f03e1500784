"""FLUX.2 adapter (diffusers' ``Flux2Transformer2DModel``) behind the engine protocol.

Latents are ``Flux2Pipeline``'s: the VAE latent patchified 2x2 into ``4c`` channels and packed as
``[B, (h/2)(w/2), 4c]`` tokens in raster order, with 4-axis position ids (T, H, W, L) for the image and
the text (the pipeline's own static helpers). The transformer takes ``timestep = sigma`` (the pipeline
divides by 1000) and the embedded guidance (FLUX.2 [dev] is guidance-distilled, 4.0 by default). Text
is Mistral-3's hidden states of ``text_encoder_out_layers`` stacked (padded to ``max_sequence_length``
as the pipeline pads). ``decode`` undoes the VAE's batch-norm statistics and the patchify, and returns
images ``[B, 3, H, W]`` in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ._cache import PromptEmbeddingCache
from ..model_files import MODEL_FILES, require_files
from ._vae import decode_in_chunks, packed_grid

__all__ = ["Flux2Policy", "load_flux2_policy"]


class Flux2Policy(torch.nn.Module):
    """``model(x packed [B, N, 4c], sigma [B], cond) -> velocity`` (fp32 out), with ``encode_prompts``,
    ``prepare_latents`` (as the pipeline draws and packs them) and ``decode``."""

    def __init__(self, pipe, height: int = 1024, width: int = 1024, guidance_scale: float | None = 4.0,
                 max_sequence_length: int = 512, text_encoder_out_layers: Sequence[int] = (10, 20, 30)) -> None:
        super().__init__()
        self.height, self.width = height, width
        self.grid = packed_grid(pipe.vae_scale_factor, height, width)  # patchified latent (h/2, w/2)
        self.guidance_scale, self.max_sequence_length = guidance_scale, max_sequence_length
        self.text_encoder_out_layers = tuple(text_encoder_out_layers)
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder
        self._pipe = pipe
        self._cache = PromptEmbeddingCache()
        self.compute_dtype: torch.dtype | None = None  # the inputs' dtype (None: the parameters')
        probe = torch.zeros(1, 1, *self.grid)
        self.register_buffer("img_ids", pipe._prepare_latent_ids(probe)[0], persistent=False)

    @property
    def channels(self) -> int:
        return self.transformer.config.in_channels  # 4 x the VAE's latent channels

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        dtype = self.compute_dtype or next(self.transformer.parameters()).dtype
        b = x.shape[0]
        text = cond["prompt_embeds"]
        guidance = None
        if self.transformer.config.guidance_embeds:
            if self.guidance_scale is None:
                raise ValueError("this FLUX.2 transformer is guidance-distilled: set guidance_scale")
            guidance = torch.full((b,), float(self.guidance_scale), device=x.device, dtype=torch.float32)
        txt_ids = self._pipe._prepare_text_ids(text).to(x.device)
        out = self.transformer(hidden_states=x.to(dtype), timestep=sigma.to(device=x.device, dtype=dtype),
                               guidance=guidance, encoder_hidden_states=text.to(dtype), txt_ids=txt_ids,
                               img_ids=self.img_ids.to(x.device).expand(b, -1, -1), return_dict=False)[0]
        return out[:, : x.shape[1]].float()

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        def encode(new: list[str]) -> dict[str, torch.Tensor]:
            device = next(self.text_encoder.parameters()).device
            emb, _ = self._pipe.encode_prompt(prompt=new, device=device, max_sequence_length=self.max_sequence_length,
                                              text_encoder_out_layers=self.text_encoder_out_layers)
            return {"prompt_embeds": emb}

        return self._cache(prompts, encode)

    def prepare_latents(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        z = torch.randn((n, self.channels, *self.grid), generator=generator, device=device)
        return self._pipe._pack_latents(z)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int = 4) -> torch.Tensor:
        bn, eps = self.vae.bn, self.vae.config.batch_norm_eps

        def to_vae(z):
            z = z.permute(0, 2, 1).reshape(z.shape[0], self.channels, *self.grid)  # tokens are in raster order
            z = z * torch.sqrt(bn.running_var.view(1, -1, 1, 1).float() + eps).to(z.device) + \
                bn.running_mean.view(1, -1, 1, 1).float().to(z.device)
            return self._pipe._unpatchify_latents(z)

        return decode_in_chunks(self.vae, latents, batch, to_vae)

    def save_pretrained(self, folder) -> None:
        self._pipe.save_pretrained(folder)


def load_flux2_policy(path, dtype: torch.dtype = torch.bfloat16, height: int = 1024, width: int = 1024,
                      guidance_scale: float | None = 4.0, max_sequence_length: int = 512,
                      text_encoder_out_layers: Sequence[int] = (10, 20, 30)) -> Flux2Policy:
    """Load FLUX.2 from a local diffusers ``Flux2Pipeline`` folder."""
    from diffusers import Flux2Pipeline

    root = Path(path)
    require_files(root, MODEL_FILES["flux2"], "FLUX.2")
    pipe = Flux2Pipeline.from_pretrained(root, torch_dtype=dtype)
    return Flux2Policy(pipe, height, width, guidance_scale, max_sequence_length, text_encoder_out_layers)
