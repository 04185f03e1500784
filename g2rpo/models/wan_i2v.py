"""Wan image-to-video (diffusers' ``WanImageToVideoPipeline``: Wan 2.1 I2V / FLF2V with a CLIP image encoder, Wan 2.2
I2V A14B with two experts, Wan 2.2 TI2V-5B) behind the engine protocol.

Each prompt comes with a conditioning image and optionally a last image (:func:`g2rpo.prompts.load_prompt_images`,
given to the policy by :meth:`WanI2VPolicy.set_prompt_images`). What the pipeline computes from them once per call
is computed here once per prompt, with the text embeddings, and shared by the whole group:

* ``condition [1, C_mask + C, F', h, w]``: the frame mask and the VAE latents of the video ``[image, zeros..,
  (last image)]``, normalised, exactly as ``WanImageToVideoPipeline.prepare_latents`` builds them (it is called);
* ``image_embeds [1, n, tokens, D]`` (Wan 2.1, whose transformer has ``image_dim``): the image encoder's
  penultimate hidden states of the image (and the last image: ``n = 2``), as ``encode_image``.

The transformer sees ``cat([x, condition], channels)`` and ``encoder_hidden_states_image`` (the ``n`` images of a
row in order, as the pipeline passes them). Everything else (two experts, guidance, decoding) is
:class:`~g2rpo.models.wan.WanPolicy`'s.

Wan 2.2 TI2V-5B (``expand_timesteps``): ``condition [1, C, 1, h, w]`` is the image's latent frame; the transformer
sees the latents with their first frame replaced by it, and timestep 0 on that frame's tokens, as the pipeline. The
pipeline also replaces the first latent frame of its result by the condition; here the velocity of that frame is the
straight line to the condition, ``(x - condition) / sigma``, so every ODE or SDE path ends on it at sigma 0 (exactly
on the ODE; under ``sampler.quantize_timesteps`` the model's sigma is the quantised one and the end point is off by
that rounding). That frame's velocity does not depend on the weights, so it adds nothing to the policy ratio.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..hub import dtype_kwarg
from ..prompts import read_image
from ._vae import checked_folder
from .wan import WanPolicy

__all__ = ["WanI2VPolicy"]


class WanI2VPolicy(WanPolicy):
    """Wan image-to-video: :class:`WanPolicy` with each prompt's image condition."""

    def __init__(self, pipe, *args, **kwargs) -> None:
        super().__init__(pipe, *args, **kwargs)
        self.image_encoder = pipe.image_encoder
        self.uses_image_embeds = pipe.transformer.config.image_dim is not None
        if self.uses_image_embeds and pipe.image_encoder is None:
            raise ValueError("this Wan image-to-video transformer takes image embeddings (image_dim) but the "
                             "pipeline has no image_encoder")
        self.prompt_images: dict = {}

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.bfloat16, **settings) -> WanI2VPolicy:
        """Wan image-to-video from a local diffusers ``WanImageToVideoPipeline`` folder."""
        from diffusers import WanImageToVideoPipeline

        pipe = WanImageToVideoPipeline.from_pretrained(checked_folder(path, "wan_i2v"), **dtype_kwarg(dtype))
        pipe.vae.to(torch.float32)  # as WanPolicy: the VAE (encoding the condition too) in fp32
        if pipe.image_encoder is not None:
            pipe.image_encoder.to(torch.float32)
        return cls(pipe, **settings)

    def set_prompt_images(self, images: Mapping) -> None:
        """``{prompt: ImagePrompt}``: the conditioning image (and last image) of every prompt this policy sees."""
        images = dict(images)
        with_last = [p for p, e in images.items() if e.last_image is not None]
        if self.expand_timesteps and with_last:  # the pipeline would ignore it (its condition is the image alone)
            raise ValueError(f"prompt {with_last[0]!r} names a last image, which Wan 2.2 TI2V-5B (expand_timesteps) "
                             "does not take; drop last_image")
        if self.uses_image_embeds and self._pipe.transformer.config.get("pos_embed_seq_len") is None:
            with_last = [p for p, e in images.items() if e.last_image is not None]
            if with_last:
                raise ValueError(f"prompt {with_last[0]!r} names a last image, which this Wan 2.1 image-to-video "
                                 "transformer cannot take (no pos_embed_seq_len: it is not an FLF2V model); use a "
                                 "Wan 2.1 FLF2V or Wan 2.2 I2V model, or drop last_image")
        self.prompt_images = images
        self._cache.clear()

    def encode_batch(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        out = super().encode_batch(prompts)
        conds = [self._condition(p) for p in prompts]
        out["condition"] = torch.cat([c for c, _ in conds])
        if self.uses_image_embeds:
            out["image_embeds"] = torch.cat([e for _, e in conds])
        return out

    @torch.no_grad()
    def _condition(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        entry = self.prompt_images.get(prompt)
        if entry is None:
            raise KeyError(f"image-to-video: no conditioning image for prompt {prompt!r} (prompt files name one per "
                           "prompt: {\"prompt\": ..., \"image\": ...})")
        pipe = self._pipe
        device = self.text_device(self.vae)
        image = read_image(entry.image)  # as diffusers.utils.load_image: EXIF orientation, RGB
        last = read_image(entry.last_image) if entry.last_image is not None else None
        embeds = None
        if self.uses_image_embeds:
            embeds = pipe.encode_image(image if last is None else [image, last], device).float().unsqueeze(0)
        pre = lambda im: pipe.video_processor.preprocess(im, height=self.height, width=self.width).to(  # noqa: E731
            device, dtype=torch.float32)
        placeholder = torch.zeros(1, *self.latent_shape, device=device)  # no noise is drawn here
        out = pipe.prepare_latents(pre(image), 1, self.latent_channels, self.height, self.width, self.num_frames,
                                   torch.float32, device, None, placeholder, None if last is None else pre(last))
        return out[1].float(), embeds  # (latents, condition[, first_frame_mask]): the condition

    def _frame_mask(self, like: torch.Tensor) -> torch.Tensor:
        """``expand_timesteps``: 0 on the first latent frame, 1 elsewhere, ``[1, 1, F', h, w]``."""
        _, f, h, w = self.latent_shape
        mask = torch.ones(1, 1, f, h, w, device=like.device, dtype=like.dtype)
        mask[:, :, 0] = 0
        return mask

    def model_timestep(self, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if not self.expand_timesteps:
            return t
        tokens = self._frame_mask(t)[0, 0][:, ::2, ::2].flatten()  # timestep 0 on the image frame's tokens
        return t[:, None] * tokens[None]

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        v = super().forward(x, sigma, cond)
        if not self.expand_timesteps:
            return v
        first = (x[:, :, :1].float() - cond["condition"].to(x.device, torch.float32)) / sigma.float().to(
            x.device).view(-1, 1, 1, 1, 1)  # the straight line to the image frame
        return torch.cat([first, v[:, :, 1:]], dim=2)

    def model_input(self, x: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        c = cond["condition"].to(x.device, x.dtype)
        if self.expand_timesteps:  # the first latent frame replaced by the image's
            m = self._frame_mask(x)
            return (1 - m) * c + m * x
        return torch.cat([x, c], dim=1)

    def transformer_kwargs(self, cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.uses_image_embeds:
            return {}
        e = cond["image_embeds"]  # [B, n, tokens, D] -> the pipeline's [B * n, tokens, D]
        return {"encoder_hidden_states_image": e.reshape(-1, *e.shape[2:])}
