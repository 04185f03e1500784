"""``scene_exact``: the scenes world's rule-based judge (the GenEval analogue; never trained on anything).

It segments an image by nearest palette colour (the background included), finds 4-connected components per
colour (smaller than ``min_area`` pixels: noise, ignored), classifies each component's shape from its bounding
box (aspect ratio, fill), and decides per prompt, with GenEval's rules per category:

* single_object / colors: at least one object of the shape (of the colour);
* two_object / color_attr: each named object present (with its colour: a swap fails);
* counting: exactly N objects of the shape and colour;
* position: both present, and a pair of them whose centroids lie on the named side by more than
  ``margin`` pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from .grammar import BACKGROUND, CATEGORIES, COLORS, PALETTE, RELATIONS, Meaning, Obj, parse_prompt
from .render import check_scene_batch

__all__ = ["Detection", "detect", "classify_shape", "judge_one", "SceneExact"]


@dataclass(frozen=True)
class Detection:
    color: str
    shape: str  # a shape of the grammar, or "unknown"
    area: int
    cy: float
    cx: float


def classify_shape(mask: np.ndarray) -> str:
    """The shape of one component, from its bounding box: bars are long and full, squares full, circles
    about 3/4 full, triangles about half full."""
    ys, xs = np.nonzero(mask)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(ys) / (h * w)
    aspect = max(h, w) / min(h, w)
    if aspect >= 2.5:
        return "bar" if fill >= 0.8 else "unknown"
    if aspect > 1.9:
        return "triangle" if 0.4 <= fill < 0.7 else "unknown"
    if fill >= 0.92:
        return "square" if aspect <= 1.35 else "unknown"
    if fill >= 0.7:
        return "circle" if aspect <= 1.35 else "unknown"
    if fill >= 0.4:
        return "triangle"
    return "unknown"


_PALETTE = np.asarray([BACKGROUND] + [PALETTE[c] for c in COLORS], dtype=np.float32)  # [7, 3]


def detect(image: np.ndarray | torch.Tensor, min_area: int = 3) -> list[Detection]:
    """The objects in one image ``[3, H, W]`` in [0, 1]."""
    x = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, np.float32)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"scene images are [3, H, W], got shape {tuple(x.shape)}")
    d = ((x[None] - _PALETTE[:, :, None, None]) ** 2).sum(1)  # [7, H, W]
    label = d.argmin(0)
    out = []
    for ci, color in enumerate(COLORS, start=1):
        comps, n = ndimage.label(label == ci)
        for k in range(1, n + 1):
            mask = comps == k
            area = int(mask.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(mask)
            out.append(Detection(color, classify_shape(mask), area, float(ys.mean()), float(xs.mean())))
    return out


def _matches(d: Detection, o: Obj) -> bool:
    return d.shape == o.shape and (o.color is None or d.color == o.color)


def judge_one(m: Meaning, found: list[Detection], margin: float = 1.0) -> bool:
    """Whether the detections satisfy the meaning (GenEval's rule for its category)."""
    a = [d for d in found if _matches(d, m.a)]
    if m.category in ("single_object", "colors"):
        return len(a) >= 1
    if m.category == "counting":
        return len(a) == m.count
    b = [d for d in found if _matches(d, m.b)]
    if m.category in ("two_object", "color_attr"):
        return bool(a) and bool(b)
    if m.category == "position":
        axis, sign = RELATIONS[m.relation]
        for da in a:
            for db in b:
                delta = (da.cx - db.cx) if axis == "x" else (da.cy - db.cy)
                if delta * sign > margin:
                    return True
        return False
    raise ValueError(f"unknown category {m.category!r}")


class SceneExact:
    """The exact judge as a reward (``score`` -> 1.0 correct / 0.0 wrong) and an evaluator (overall and per
    category accuracy)."""

    name = "scene_exact"

    def __init__(self, min_area: int = 3, margin: float = 1.0) -> None:
        self.min_area, self.margin = int(min_area), float(margin)

    def correct(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_scene_batch(self.name, images, prompts)
        return torch.tensor([float(judge_one(parse_prompt(p), detect(img, self.min_area), self.margin))
                             for img, p in zip(images, prompts)])

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.correct(images, prompts)

    @staticmethod
    def prompt_group(prompt: str) -> str:
        """The prompt's GenEval category (``python -m g2rpo.eval`` reports the judge per category)."""
        return parse_prompt(prompt).category

    def evaluate(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
        """``scene_exact`` (overall accuracy) and ``scene_exact/<category>`` for each category present."""
        return self.summarize(self.correct(images, prompts), prompts)

    @staticmethod
    def summarize(ok: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
        """:meth:`evaluate`'s numbers from verdicts already taken (``ok [N]`` of :meth:`correct`)."""
        cats = [parse_prompt(p).category for p in prompts]
        out = {"scene_exact": float(ok.mean())}
        for c in CATEGORIES:
            idx = [i for i, k in enumerate(cats) if k == c]
            if idx:
                out[f"scene_exact/{c}"] = float(ok[idx].mean())
        return out


def build_exact(min_area: int = 3, margin: float = 1.0) -> SceneExact:
    """The reward registry's builder for ``scene_exact`` (no world: it is rules, not weights)."""
    return SceneExact(min_area, margin)
