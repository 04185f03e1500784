"""UnifiedReward: a vision-language judge (Qwen2.5-VL through transformers) asked for a score.

The judge sees the image and a caption-rating instruction (``template``, with ``{prompt}``)
and answers in text; the score is the number after the last ``Final Score:`` in the
answer (greedy decoding, so it is deterministic). An answer without a parsable score gives
NaN — never a silent default — which the trainer refuses with the prompt named and the
evaluator reports. Optional: only transformers is needed, the weights come from a local
folder (``model_dir``: a Qwen2.5-VL checkpoint such as UnifiedReward-qwen-7b).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from .clip_models import _BatchedModelReward

__all__ = ["UnifiedReward", "parse_final_score", "DEFAULT_TEMPLATE"]

DEFAULT_TEMPLATE = (
    "You are given a text caption and an image generated from it. Evaluate the image on two criteria: "
    "1. alignment with the caption (are the described elements, attributes and relations present?) and "
    "2. overall image quality (clarity, detail, realism, aesthetics). Briefly list the key elements of the "
    "caption and whether the image shows them, then give one overall score from 1 to 5 after 'Final Score:'.\n"
    "Text Caption: [{prompt}]")

_SCORE = re.compile(r"Final Score:\s*\**\s*([-+]?\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_final_score(answer: str) -> float:
    """The number after the last ``Final Score:`` in ``answer``; NaN when there is none."""
    found = _SCORE.findall(answer)
    return float(found[-1]) if found else math.nan


class UnifiedReward(_BatchedModelReward):
    name = "unified_reward"

    def __init__(self, model, processor, template: str = DEFAULT_TEMPLATE, max_new_tokens: int = 256, device=None,
                 batch_size: int = 4) -> None:
        super().__init__(model, device, batch_size)
        self.processor, self.template, self.max_new_tokens = processor, template, max_new_tokens
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every row at the end

    def _messages(self, prompt: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": self.template.format(prompt=prompt)}]}]

    @torch.no_grad()
    def judge(self, images: torch.Tensor, prompts: Sequence[str]) -> list[str]:
        """The judge's answers (greedy)."""
        answers = []
        for pil, ps in self.batches(images, prompts):
            texts = [self.processor.apply_chat_template(self._messages(p), tokenize=False, add_generation_prompt=True)
                     for p in ps]
            inputs = self.processor(text=texts, images=pil, padding=True, return_tensors="pt").to(self.device)
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            answers += self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return answers

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([parse_final_score(a) for a in self.judge(images, prompts)], dtype=torch.float32)


def load_unified_reward(model_dir: str, template: str | None = None, max_new_tokens: int = 256, device=None,
                        batch_size: int = 4, dtype: str = "auto") -> UnifiedReward:
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"unified_reward: no model at {d} (missing {d / 'config.json'})")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(d, dtype=torch_dtype)
    processor = AutoProcessor.from_pretrained(d)
    return UnifiedReward(model, processor, template or DEFAULT_TEMPLATE, max_new_tokens, device, batch_size)
