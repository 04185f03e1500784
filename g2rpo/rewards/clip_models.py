"""CLIP-family rewards: HPS-v2.1 and CLIP score (open_clip), PickScore (transformers).

* ``hps`` — open_clip ``ViT-H-14`` with the HPS-v2.1 checkpoint (a file holding
  ``{"state_dict": ...}``), HPS's preprocessing (resize the longest side, pad; open_clip's
  ``image_resize_mode="longest"``), score = cosine of the normalised image and text
  features (the diagonal of ``image_features @ text_features.T``), as the public code.
* ``clip`` — CLIP score with an open_clip model from a local directory
  (``local-dir:`` layout: ``open_clip_config.json`` + weights; the public code uses DFN5B
  ViT-H-14) or from a model name + checkpoint file; score = cosine similarity.
* ``pickscore`` — transformers ``CLIPModel`` + processor from a local directory;
  score = ``logit_scale.exp() * cosine`` (raw PickScore, ~20-23; the paper's table reports /100).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ..safeload import load_torch_file
from ._images import check_batch, to_pil

__all__ = ["OpenClipScore", "PickScore", "open_clip_model"]


class _BatchedModelReward:
    """A reward around one torch model: eval mode, a device, a batch size."""

    def __init__(self, model, device=None, batch_size: int = 32) -> None:
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        self.batch_size = batch_size

    def batches(self, images: torch.Tensor, prompts: Sequence[str]):
        """Checked ``(PIL images, prompts)`` chunks of ``batch_size``."""
        check_batch(images, prompts, self.name)
        for lo in range(0, len(prompts), self.batch_size):
            yield to_pil(images[lo:lo + self.batch_size]), list(prompts[lo:lo + self.batch_size])


class OpenClipScore(_BatchedModelReward):
    """Cosine similarity of an open_clip model's normalised image and text features."""

    def __init__(self, model, preprocess, tokenizer, name: str, device=None, batch_size: int = 32) -> None:
        super().__init__(model, device, batch_size)
        self.preprocess, self.tokenizer, self.name = preprocess, tokenizer, name

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        out = []
        for pil, texts in self.batches(images, prompts):
            x = torch.stack([self.preprocess(p) for p in pil]).to(self.device)
            tokens = self.tokenizer(texts).to(self.device)
            img = self.model.encode_image(x, normalize=True)
            txt = self.model.encode_text(tokens, normalize=True)
            out.append((img * txt).sum(-1).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The normalised image embeddings ``[N, D]`` (the feature space of the validation's diversity metric)."""
        out = []
        for pil, _ in self.batches(images, [""] * len(images)):
            x = torch.stack([self.preprocess(p) for p in pil]).to(self.device)
            out.append(self.model.encode_image(x, normalize=True).float().cpu())
        return torch.cat(out)


def _require(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    return p


def load_hps(checkpoint: str, model_name: str = "ViT-H-14", device=None, batch_size: int = 32,
             open_clip_model: str | None = None) -> OpenClipScore:
    """HPS-v2.1 from its checkpoint file (``open_clip_model`` is accepted for configs and unused:
    the HPS checkpoint holds the full ViT-H-14 weights)."""
    import open_clip

    ckpt = _require(checkpoint, "HPS checkpoint")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None, output_dict=True,
                                                                 image_resize_mode="longest")
    state = load_torch_file(ckpt, "HPS checkpoint")  # tensors and containers only: a crafted file runs nothing
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ValueError(f"{ckpt} is not an HPS checkpoint: expected a dict with a 'state_dict' entry")
    model.load_state_dict(state["state_dict"], strict=True)
    return OpenClipScore(model, preprocess, open_clip.get_tokenizer(model_name), "hps", device, batch_size)


def open_clip_model(model_dir: str | None = None, model_name: str | None = None, checkpoint: str | None = None,
                    what: str = "clip reward"):
    """``(model, preprocess, tokenizer)`` of an open_clip model from ``model_dir`` (the ``local-dir:`` layout) or
    ``model_name`` + ``checkpoint``; never silently random."""
    import open_clip

    if model_dir is not None:
        d = _require(model_dir, "CLIP model directory")
        # create_model_from_pretrained raises when no weights file is found (never silently random)
        try:
            model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{d}")
        except RuntimeError as err:
            raise FileNotFoundError(
                f"{what}: no weights loaded from {d}: open_clip looks for open_clip_model.safetensors, "
                f"open_clip_pytorch_model.bin or .pth (a .pt file is ignored) ({err})") from None
        return model, preprocess, open_clip.get_tokenizer(f"local-dir:{d}")
    if model_name is not None and checkpoint is not None:
        ckpt = _require(checkpoint, "CLIP checkpoint")
        model, preprocess = open_clip.create_model_from_pretrained(model_name, pretrained=str(ckpt))
        return model, preprocess, open_clip.get_tokenizer(model_name)
    raise ValueError(f"{what}: give model_dir, or model_name and checkpoint")


def load_clip_score(model_dir: str | None = None, model_name: str | None = None, checkpoint: str | None = None,
                    device=None, batch_size: int = 32) -> OpenClipScore:
    """CLIP score from ``model_dir`` (open_clip ``local-dir:`` layout) or ``model_name`` + ``checkpoint``."""
    model, preprocess, tokenizer = open_clip_model(model_dir, model_name, checkpoint)
    return OpenClipScore(model, preprocess, tokenizer, "clip", device, batch_size)


class PickScore(_BatchedModelReward):
    """PickScore: ``logit_scale.exp() * cosine(image, text) / divide_by`` with a transformers CLIPModel
    (``divide_by`` 26: Flow-GRPO's ``pickscore_scorer.py``, which makes its std's + 1e-4 weigh 26x more)."""

    name = "pickscore"

    def __init__(self, model, processor, device=None, batch_size: int = 32, divide_by: float = 1.0) -> None:
        super().__init__(model, device, batch_size)
        if not (isinstance(divide_by, (int, float)) and not isinstance(divide_by, bool) and divide_by > 0
                and math.isfinite(divide_by)):
            raise ValueError(f"pickscore: divide_by must be a finite number > 0, got {divide_by!r}")
        self.processor = processor
        self.divide_by = float(divide_by)

    @staticmethod
    def _features(out) -> torch.Tensor:
        # transformers 5 returns an output object (pooler_output); older versions a tensor
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        out = []
        for pil, texts in self.batches(images, prompts):
            px = self.processor(images=pil, return_tensors="pt")["pixel_values"].to(self.device)
            tx = self.processor(text=texts, padding=True, truncation=True,
                                max_length=77, return_tensors="pt").to(self.device)
            img = self._features(self.model.get_image_features(pixel_values=px))
            txt = self._features(self.model.get_text_features(**tx))
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            out.append((self.model.logit_scale.exp() * (img * txt).sum(-1)).float().cpu())
        return torch.cat(out) / self.divide_by


def load_pickscore(model_dir: str, processor_dir: str | None = None, device=None, batch_size: int = 32,
                   divide_by: float = 1.0) -> PickScore:
    from transformers import AutoModel, AutoProcessor

    d = _require(model_dir, "PickScore model directory")
    processor = AutoProcessor.from_pretrained(_require(processor_dir, "PickScore processor") if processor_dir else d)
    return PickScore(AutoModel.from_pretrained(d), processor, device, batch_size, divide_by)
