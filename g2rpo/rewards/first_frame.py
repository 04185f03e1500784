"""``first_frame``: image-to-video consistency, the CLIP image similarity between each prompt's conditioning image
and the first ``num_frames`` frames of its video (the mean of their cosines), with an open_clip model
(``model_dir``, or ``model_name`` + ``checkpoint``; the ``clip`` reward's usual repo by default). The conditioning
images come from the run's image-to-video prompt file (``prompt_file``, by default ``data.prompts``). A video
reward: it scores ``[N, 3, F, H, W]`` as a whole (an image ``[N, 3, H, W]`` is a one-frame video)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..prompts import read_image
from ._images import check_batch, to_pil
from .clip_models import _BatchedModelReward, open_clip_model

__all__ = ["FirstFrameSimilarity", "load_first_frame"]


class FirstFrameSimilarity(_BatchedModelReward):
    name = "first_frame"
    video_reward = True  # FrameAggregated passes videos through whole

    def __init__(self, model, preprocess, images: dict, num_frames: int = 1, device=None,
                 batch_size: int = 32) -> None:
        super().__init__(model, device, batch_size)
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"first_frame: num_frames must be an int >= 1, got {num_frames!r}")
        self.preprocess, self.images, self.num_frames = preprocess, images, num_frames
        self._cond: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _features(self, pil) -> torch.Tensor:
        out = []
        for lo in range(0, len(pil), self.batch_size):
            x = torch.stack([self.preprocess(p) for p in pil[lo:lo + self.batch_size]]).to(self.device)
            out.append(self.model.encode_image(x, normalize=True).float().cpu())
        return torch.cat(out)

    def _condition(self, prompt: str) -> torch.Tensor:
        if prompt not in self._cond:
            entry = self.images.get(prompt)
            if entry is None:
                raise KeyError(f"first_frame: no conditioning image for prompt {prompt!r} in the prompt file")
            self._cond[prompt] = self._features([read_image(entry.image)])[0]
        return self._cond[prompt]

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        videos = images.unsqueeze(2) if images.ndim == 4 else images
        if videos.ndim != 5:
            raise ValueError(f"first_frame: expected videos [N, 3, F, H, W] or images, got {tuple(images.shape)}")
        n, f = videos.shape[0], min(self.num_frames, videos.shape[2])
        frames = videos[:, :, :f].transpose(1, 2).reshape(n * f, *videos.shape[1:2], *videos.shape[3:])
        check_batch(frames, [p for p in prompts for _ in range(f)], self.name)
        feats = self._features(to_pil(frames)).view(n, f, -1)
        cond = torch.stack([self._condition(p) for p in prompts])
        return (feats * cond[:, None]).sum(-1).mean(1)


def load_first_frame(prompt_file: str, model_dir: str | None = None, model_name: str | None = None,
                     checkpoint: str | None = None, num_frames: int = 1, device=None,
                     batch_size: int = 32) -> FirstFrameSimilarity:
    from ..prompts import load_prompt_images

    model, preprocess, _ = open_clip_model(model_dir, model_name, checkpoint, what="first_frame reward")
    return FirstFrameSimilarity(model, preprocess, load_prompt_images(prompt_file), num_frames, device, batch_size)
