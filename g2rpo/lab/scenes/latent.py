"""The scenes world's latent: one token per object slot, and the fixed decoder that draws it.

Flux generates in a VAE's latent space and a fixed decoder turns latents into pixels. The scenes world does the
same with an object-centric latent: ``[slots, SLOT_CHANNELS]``, one token per object (at most ``slots``), each
token holding

====================  =======  ====================================================================
channels              name     meaning (clean latents: the encoding of a render)
====================  =======  ====================================================================
0                     presence +1 an object, -1 an empty slot (the decoder draws it when > 0)
1-3                   color    its RGB, scaled to [-1, 1] (the decoder keeps any colour, on the palette
                               or off it: an off-palette colour is the generator's error to make)
4-7                   shape    +1 for its shape, -1 for the others (the decoder takes the argmax)
8-9                   center   its centroid (y, x) in pixels, scaled from [0, S-1] to [-1, 1]
10                    size     the index of its size among ``SIZES[shape]``, scaled to [-1, 1]
11                    orient   +1 a flat bar, -1 a standing one, 0 the other shapes
====================  =======  ====================================================================

The decoder (:class:`SlotDecoder`) has no weights: it rounds the centre to the mask's corner (clamped into the
image), draws the slots in order, a later one over an earlier one, on the background. ``decode(encode(scene))``
is the render of the scene, bit for bit. Everything else the generator can get wrong, and the judges see it as
they would in a real model's image: a missing or extra object, the wrong shape, colour or size, objects that
overlap or touch (they merge into one component), a relation on the wrong side. Copies of one object (a count)
are encoded left to right (by centroid x, then y), so that a scene has one encoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby

import numpy as np
import torch

from .grammar import BACKGROUND, PALETTE, SHAPES
from .render import SIZES, Placed, mask_of

__all__ = ["SLOT_CHANNELS", "encode_scene", "encode_scenes", "SlotDecoder"]

SLOT_CHANNELS = 12
PRESENCE, COLOR, SHAPE, CENTER, SIZE, ORIENT = 0, slice(1, 4), slice(4, 8), slice(8, 10), 10, 11
_MAX = max(max(SIZES[s]) for s in SHAPES)  # the largest mask side
_BANK = [(si, zi, o, mask_of(s, z, o)) for si, s in enumerate(SHAPES) for zi, z in enumerate(SIZES[s])
         for o in ((1, -1) if s == "bar" else (0,))]


def _scaled_index(i: int, n: int) -> float:
    return i / (n - 1) * 2 - 1 if n > 1 else 0.0


def encode_scene(placed: Sequence[Placed], slots: int, size: int) -> torch.Tensor:
    """The clean latent ``[slots, SLOT_CHANNELS]`` of a placed scene (``size x size``): objects in order, each run
    of identical objects sorted left to right, the other slots empty."""
    if len(placed) > slots:
        raise ValueError(f"a scene of {len(placed)} objects does not fit {slots} slots")
    ordered = [q for _, run in groupby(placed, key=lambda q: (q.shape, q.color))
               for q in sorted(run, key=lambda q: (q.centroid[1], q.centroid[0]))]  # each run left to right
    z = torch.zeros(slots, SLOT_CHANNELS)
    z[:, PRESENCE] = -1
    for k, p in enumerate(ordered):
        cy, cx = p.centroid
        z[k, PRESENCE] = 1
        z[k, COLOR] = torch.tensor(PALETTE[p.color]) * 2 - 1
        z[k, SHAPE] = -1
        z[k, SHAPE.start + SHAPES.index(p.shape)] = 1
        z[k, CENTER] = torch.tensor([cy, cx]) / (size - 1) * 2 - 1
        z[k, SIZE] = _scaled_index(SIZES[p.shape].index(p.size), len(SIZES[p.shape]))
        z[k, ORIENT] = p.orient
    return z


def encode_scenes(scenes: Sequence[Sequence[Placed]], slots: int, size: int) -> torch.Tensor:
    """``[N, slots, SLOT_CHANNELS]`` clean latents of placed scenes."""
    return torch.stack([encode_scene(s, slots, size) for s in scenes])


class SlotDecoder(torch.nn.Module):
    """Latents ``[N, slots, SLOT_CHANNELS]`` -> images ``[N, 3, size, size]`` in [0, 1] (no weights; its mask
    bank is a buffer, so it moves with the policy)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = int(size)
        bank = torch.zeros(len(_BANK), _MAX, _MAX, dtype=torch.bool)
        hw, offset = torch.zeros(len(_BANK), 2), torch.zeros(len(_BANK), 2)
        index = torch.zeros(len(SHAPES), max(len(v) for v in SIZES.values()), 3, dtype=torch.long)
        for i, (si, zi, o, m) in enumerate(_BANK):
            bank[i, : m.shape[0], : m.shape[1]] = torch.from_numpy(m)
            hw[i] = torch.tensor(m.shape, dtype=torch.float32)
            ys, xs = np.nonzero(m)
            offset[i] = torch.tensor([ys.mean(), xs.mean()])
            index[si, zi, o + 1] = i
        for name, value in (("bank", bank), ("hw", hw), ("offset", offset), ("index", index),
                            ("n_sizes", torch.tensor([len(SIZES[s]) for s in SHAPES])),
                            ("background", torch.tensor(BACKGROUND))):
            self.register_buffer(name, value, persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.float()
        n, k, s = z.shape[0], z.shape[1], self.size
        shape = z[..., SHAPE].argmax(-1)
        n_sizes = self.n_sizes[shape]
        size_idx = ((z[..., SIZE].clamp(-1, 1) + 1) / 2 * (n_sizes - 1)).round().long()
        orient = torch.where(shape == SHAPES.index("bar"), torch.where(z[..., ORIENT] >= 0, 1, -1), 0)
        t = self.index[shape, size_idx, orient + 1]  # [n, k] mask ids
        center = (z[..., CENTER] + 1) / 2 * (s - 1)
        corner = (center - self.offset[t].float()).round().clamp(min=0)  # fp32 whatever dtype the policy moved to
        corner = torch.minimum(corner, s - self.hw[t].float()).long()  # the whole mask inside the image
        rows = torch.arange(s, device=z.device)
        dy = rows[None, None, :, None] - corner[..., 0, None, None]  # [n, k, s, 1]
        dx = rows[None, None, None, :] - corner[..., 1, None, None]  # [n, k, 1, s]
        inside = (dy >= 0) & (dy < _MAX) & (dx >= 0) & (dx < _MAX)
        full = (n, k, s, s)
        drawn = self.bank[t[..., None, None].expand(full), dy.clamp(0, _MAX - 1).expand(full),
                          dx.clamp(0, _MAX - 1).expand(full)] & inside & (z[..., PRESENCE] > 0)[..., None, None]
        color = ((z[..., COLOR] + 1) / 2).clamp(0, 1)
        img = self.background[None, :, None, None].expand(n, 3, s, s).to(z.dtype)
        for j in range(k):  # later slots over earlier ones
            img = torch.where(drawn[:, j, None], color[:, j, :, None, None], img)
        return img
