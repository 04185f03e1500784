"""ImageReward (BLIP-based) rebuilt on transformers' BLIP classes.

The ``image-reward`` package does not import with transformers 5 (its BLIP ``med.py`` uses
removed helpers, it needs the undeclared ``clip`` package and pins an old timm), so the
model is rebuilt exactly: BLIP ViT-L/16 at 224 px (``BlipVisionModel``, LayerNorm eps 1e-6)
+ a BERT-base text encoder with cross-attention to the image (``BlipTextModel``, the port
of BLIP's ``med.py``) + ImageReward's MLP head (768-1024-128-64-16-1, no activations).
``score = (MLP(text [CLS]) - 0.16717) / 1.03334``; prompts padded to 35 tokens; images
resized (bicubic) to 224, centre-cropped, normalised with CLIP's mean/std.

Files (``model_dir`` or each given): ``ImageReward.pt`` (the official plain state_dict, keys
renamed on load), ``med_config.json`` (BLIP's BERT config), ``vocab.txt`` (bert-base-uncased).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..safeload import load_torch_file
from .clip_models import _BatchedModelReward

__all__ = ["ImageRewardModel", "ImageReward", "convert_official_state_dict", "REWARD_MEAN", "REWARD_STD"]

REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIT_LARGE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=224, patch_size=16, layer_norm_eps=1e-6)


class ImageRewardModel(torch.nn.Module):
    def __init__(self, vision_cfg, text_cfg) -> None:
        from transformers import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        super().__init__()
        self.vision_model = BlipVisionModel(vision_cfg)
        self.text_encoder = BlipTextModel(text_cfg, add_pooling_layer=False)
        h = text_cfg.hidden_size
        self.mlp = torch.nn.Module()
        self.mlp.layers = torch.nn.Sequential(
            torch.nn.Linear(h, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                                 encoder_attention_mask=image_mask).last_hidden_state
        raw = self.mlp.layers(text[:, 0, :]).squeeze(-1)
        return (raw - REWARD_MEAN) / REWARD_STD


_VISION_RENAMES = [
    ("blip.visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("blip.visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("blip.visual_encoder.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
    ("blip.visual_encoder.norm.", "vision_model.post_layernorm."),
]
_BLOCK_RENAMES = [(".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2."), (".attn.qkv.", ".self_attn.qkv."),
                  (".attn.proj.", ".self_attn.projection."), (".mlp.", ".mlp.")]


def convert_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageReward.pt keys -> :class:`ImageRewardModel` keys (drops the unused projections)."""
    out = {}
    for key, value in state.items():
        if key.startswith(("blip.vision_proj", "blip.text_proj")) or key.endswith("position_ids"):
            continue
        new = key
        if key.startswith("blip.visual_encoder.blocks."):
            new = key.replace("blip.visual_encoder.blocks.", "vision_model.encoder.layers.")
            for a, b in _BLOCK_RENAMES:
                new = new.replace(a, b)
        elif key.startswith("blip.text_encoder."):
            new = "text_encoder." + key[len("blip.text_encoder."):]
        else:
            for a, b in _VISION_RENAMES:
                if key.startswith(a):
                    new = b + key[len(a):]
                    break
        out[new] = value
    return out


class ImageReward(_BatchedModelReward):
    name = "imagereward"

    def __init__(self, model: ImageRewardModel, tokenizer, image_size: int = 224, device=None,
                 batch_size: int = 16, max_length: int = 35) -> None:
        from torchvision import transforms as T

        super().__init__(model, device, batch_size)
        self.tokenizer, self.max_length = tokenizer, max_length
        self.preprocess = T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
                                     T.CenterCrop(image_size), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        out = []
        for pil, texts in self.batches(images, prompts):
            px = torch.stack([self.preprocess(p) for p in pil]).to(self.device)
            tok = self.tokenizer(texts, padding="max_length", truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            out.append(self.model(px, tok["input_ids"], tok["attention_mask"]).float().cpu())
        return torch.cat(out)


def _path(given: str | None, model_dir: str | None, name: str) -> Path:
    p = Path(given) if given else (Path(model_dir) / name if model_dir else None)
    if p is None:
        raise ValueError(f"imagereward: give model_dir or the path of {name}")
    if not p.exists():
        raise FileNotFoundError(f"imagereward: {name} not found: {p}")
    return p


def load_imagereward(model_dir: str | None = None, checkpoint: str | None = None, med_config: str | None = None,
                     vocab: str | None = None, vision: dict | None = None, device=None,
                     batch_size: int = 16) -> ImageReward:
    """Load ImageReward from local files (``vision`` overrides the ViT-L/16 config, for tiny tests)."""
    from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig

    ckpt = _path(checkpoint, model_dir, "ImageReward.pt")
    med = json.loads(_path(med_config, model_dir, "med_config.json").read_text())
    vocab_file = _path(vocab, model_dir, "vocab.txt")
    tokenizer = BertTokenizer(vocab_file=str(vocab_file))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    vision_cfg = BlipVisionConfig(**{**VIT_LARGE, **(vision or {})})
    text_cfg = BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=med["hidden_size"],
                              encoder_hidden_size=med.get("encoder_width", vision_cfg.hidden_size),
                              intermediate_size=med["intermediate_size"],
                              num_hidden_layers=med["num_hidden_layers"],
                              num_attention_heads=med["num_attention_heads"],
                              max_position_embeddings=med["max_position_embeddings"],
                              layer_norm_eps=med.get("layer_norm_eps", 1e-12), hidden_act=med.get("hidden_act", "gelu"),
                              pad_token_id=med.get("pad_token_id", 0), is_decoder=True)
    model = ImageRewardModel(vision_cfg, text_cfg)
    state = load_torch_file(ckpt, "ImageReward checkpoint")  # tensors and containers only: a crafted file runs nothing
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    missing, unexpected = model.load_state_dict(convert_official_state_dict(state), strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt} does not match ImageReward: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return ImageReward(model, tokenizer, image_size=vision_cfg.image_size, device=device, batch_size=batch_size)
