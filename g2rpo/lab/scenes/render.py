"""Procedural rendering of scenes: objects of the palette on a plain background, placed so that every object
stays whole and visible (objects never share or touch pixels: the bounded overlap is zero), and image-level
degradations (blur, noise, artifacts) for the learned rewards' negatives.

Sizes in pixels (``SIZES``): squares 4-6, circles of diameter 5 or 7, triangles (apex up) of base 5 or 7,
bars 2 x 6-7 (either orientation). A position caption's two objects are separated by at least ``MARGIN`` pixels along
its axis (centroids).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from .grammar import BACKGROUND, COLORS, PALETTE, SHAPES, Meaning, Obj, allowed_pairs

__all__ = ["SIZES", "Placed", "check_scene_batch", "layout", "mask_of", "paint", "render",
           "render_labelled", "object_label", "render_batch", "degrade", "IMAGE_DEGRADATIONS", "MARGIN"]

MARGIN = 2.0  # minimum centroid separation along a position caption's axis
IMAGE_DEGRADATIONS = ("blur", "noise", "artifacts")


#: each shape's sizes in pixels: a square's side, a circle's diameter, a triangle's base, a bar's length
SIZES: dict[str, tuple[int, ...]] = {"square": (4, 5, 6), "circle": (5, 7), "triangle": (5, 7), "bar": (6, 7)}


def mask_of(shape: str, size: int, orient: int = 0) -> np.ndarray:
    """The boolean mask of one object: ``shape`` at ``size`` (one of ``SIZES[shape]``); a bar lies flat
    (``orient`` +1: 2 rows) or stands (-1: 2 columns), the other shapes take ``orient`` 0."""
    if shape not in SIZES:
        raise ValueError(f"unknown shape {shape!r}")
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        yy, xx = np.mgrid[:size, :size]
        c = (size - 1) / 2
        return (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2) ** 2
    if shape == "triangle":  # apex up
        m = np.zeros(((size + 1) // 2, size), dtype=bool)
        for row in range(m.shape[0]):
            m[row, size // 2 - row: size // 2 + row + 1] = True
        return m
    m = np.ones((2, size), dtype=bool)
    return m if orient > 0 else m.T


def _draw_form(shape: str, rng: random.Random) -> tuple[int, int]:
    """A random ``(size, orient)`` for ``shape``."""
    if shape not in SIZES:
        raise ValueError(f"unknown shape {shape!r}")
    size = rng.choice(SIZES[shape])
    return size, ((1 if rng.random() < 0.5 else -1) if shape == "bar" else 0)


@dataclass(frozen=True)
class Placed:
    """One object of a scene as drawn: shape, colour, size, orientation and the top-left corner of its mask."""

    shape: str
    color: str
    size: int
    orient: int
    y: int
    x: int

    @cached_property  # built once (cached_property writes the instance dict, so it works on a frozen dataclass)
    def mask(self) -> np.ndarray:
        return mask_of(self.shape, self.size, self.orient)

    @property
    def centroid(self) -> tuple[float, float]:
        return _centroid(self.mask, self.y, self.x)


def _centroid(mask: np.ndarray, y: int, x: int) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(ys.mean() + y), float(xs.mean() + x)


def _place(masks: list[np.ndarray], size: int, rng: random.Random, relation: tuple[str, int] | None,
           tries: int = 400) -> list[tuple[int, int]] | None:
    """Top-left corners for ``masks`` with no shared or 4-adjacent pixels (and the relation of objects 0, 1)."""
    grown_masks = []  # each mask and its 4-neighbours, padded by one (the pixels no other object may touch)
    for m in masks:
        h, w = m.shape
        g = np.zeros((h + 2, w + 2), dtype=bool)
        g[1:-1, 1:-1] = m
        g[:-2, 1:-1] |= m
        g[2:, 1:-1] |= m
        g[1:-1, :-2] |= m
        g[1:-1, 2:] |= m
        grown_masks.append(g)
    for _ in range(tries):
        occupied = np.zeros((size + 2, size + 2), dtype=bool)  # padded by one: adjacency checks at the border
        corners: list[tuple[int, int]] = []
        for m, grown in zip(masks, grown_masks):
            h, w = m.shape
            placed = False
            for _ in range(50):
                y, x = rng.randrange(0, size - h + 1), rng.randrange(0, size - w + 1)
                region = occupied[y: y + h + 2, x: x + w + 2]
                if not (region & grown).any():
                    occupied[y + 1: y + h + 1, x + 1: x + w + 1] |= m
                    corners.append((y, x))
                    placed = True
                    break
            if not placed:
                break
        if len(corners) != len(masks):
            continue
        if relation is not None:
            axis, sign = relation
            (ya, xa), (yb, xb) = (_centroid(masks[i], *corners[i]) for i in (0, 1))
            delta = (xa - xb) if axis == "x" else (ya - yb)
            if delta * sign < MARGIN:
                continue
        return corners
    return None


def render(m: Meaning, rng: random.Random, size: int = 16,
           pairs: frozenset[tuple[str, str]] | None = None) -> np.ndarray:
    """The image of :func:`render_labelled`."""
    return render_labelled(m, rng, size, pairs)[0]


def layout(m: Meaning, rng: random.Random, size: int = 16,
           pairs: frozenset[tuple[str, str]] | None = None) -> list[Placed]:
    """Where and how each object of ``m`` is drawn in a ``size x size`` scene (objects in ``m.objects()``'s
    order). An object whose colour the meaning leaves open takes a random colour whose pair with its shape lies
    in ``pairs`` (default: the training pairs, so no held-out pair is ever drawn for a caption that does not
    name it)."""
    from .grammar import RELATIONS

    pairs = allowed_pairs(False) | m.pairs() if pairs is None else pairs
    objs: list[Obj] = []
    for o in m.objects():
        if o.color is None:
            o = Obj(o.shape, rng.choice([c for c in COLORS if (c, o.shape) in pairs]))
        objs.append(o)
    relation = RELATIONS[m.relation] if m.relation else None
    for _ in range(20):
        forms = [_draw_form(o.shape, rng) for o in objs]
        corners = _place([mask_of(o.shape, *f) for o, f in zip(objs, forms)], size, rng, relation)
        if corners is not None:
            return [Placed(o.shape, o.color, s, orient, y, x) for o, (s, orient), (y, x) in zip(objs, forms, corners)]
    raise RuntimeError(f"could not place {m} in {size}x{size}")


def paint(placed: list[Placed], size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The image ``[3, size, size]`` (float32 in [0, 1]) of placed objects on the background, and its label map
    ``[size, size]`` (int64): 0 background, else :func:`object_label` of the pixel's object."""
    img = np.empty((3, size, size), dtype=np.float32)
    img[:] = np.asarray(BACKGROUND, dtype=np.float32)[:, None, None]
    labels = np.zeros((size, size), dtype=np.int64)
    for p in placed:
        mask = p.mask
        h, w = mask.shape
        img[:, p.y: p.y + h, p.x: p.x + w][:, mask] = np.asarray(PALETTE[p.color], dtype=np.float32)[:, None]
        labels[p.y: p.y + h, p.x: p.x + w][mask] = object_label(p.shape, p.color)
    return img, labels


def render_labelled(m: Meaning, rng: random.Random, size: int = 16,
                    pairs: frozenset[tuple[str, str]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An image that shows ``m`` exactly and its label map: :func:`paint` of a :func:`layout`."""
    return paint(layout(m, rng, size, pairs), size)


def object_label(shape: str, color: str) -> int:
    """The label of a (shape, colour) object in label maps: ``1 + shape * len(COLORS) + colour`` (0: background)."""
    return 1 + SHAPES.index(shape) * len(COLORS) + COLORS.index(color)


def render_batch(meanings: list[Meaning], rng: random.Random, size: int = 16,
                 pairs: frozenset[tuple[str, str]] | None = None) -> torch.Tensor:
    """``[N, 3, size, size]`` renders in [0, 1]."""
    return torch.from_numpy(np.stack([render(m, rng, size, pairs) for m in meanings]))


def check_scene_batch(name: str, images: torch.Tensor, prompts, size: int | None = None) -> None:
    """ValueError naming ``name`` unless ``images`` is ``[N, 3, S, S]`` (S = ``size`` when given) with N prompts."""
    if images.ndim != 4 or images.shape[1] != 3 or (size is not None and images.shape[-1] != size):
        shape = f"[N, 3, {size}, {size}]" if size is not None else "[N, 3, H, W]"
        raise ValueError(f"{name} takes RGB images {shape}, got shape {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")


def degrade(image: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """An image-level degradation of ``[3, S, S]`` (or ``[N, 3, S, S]``) renders in [0, 1]: ``blur`` (two 3x3
    box blurs), ``noise`` (Gaussian, std 0.25) or ``artifacts`` (a grid pattern of random palette pixels, the
    high-frequency pattern a hacked reward often rewards)."""
    x = image[None] if image.ndim == 3 else image
    if kind == "blur":
        k = torch.ones(3, 1, 3, 3) / 9
        for _ in range(2):
            x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3)
    elif kind == "noise":
        x = (x + 0.25 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
    elif kind == "artifacts":
        x = x.clone()
        n, _, h, w = x.shape
        off = torch.randint(0, 3, (n, 2), generator=generator)
        cols = torch.tensor([PALETTE[c] for c in COLORS])
        for i in range(n):
            pick = cols[torch.randint(0, len(cols), (1,), generator=generator)][0]
            x[i, :, off[i, 0]::3, off[i, 1]::3] = pick[:, None, None]
    else:
        raise ValueError(f"unknown degradation {kind!r}; known: {', '.join(IMAGE_DEGRADATIONS)}")
    return x[0] if image.ndim == 3 else x
