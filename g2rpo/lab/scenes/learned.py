"""The scenes world's learned models: two in-domain rewards and an out-of-domain judge, each trained on
rendered scenes (CPU, seconds) and saved as ``config.json`` + ``model.safetensors``.

* ``scene_clip`` (the CLIP-score analogue): an image CNN and a caption encoder trained contrastively (InfoNCE,
  both directions, with a one-attribute-wrong caption and a wrong or degraded image as hard negatives);
  the reward is ``scale * cos(image, caption)``.
* ``scene_preference`` (the HPS analogue: CLIP fine-tuned on preferences): ``scene_clip`` fine-tuned with
  Bradley-Terry on pairs of a correct render against a wrong one (colour, shape, count, position or
  attribution) or a degraded one (blur, noise, artifacts), plus the listwise form over the batch.
* ``scene_detector`` (the second judge, never trained on by RL; GenEval's design): another architecture, a
  fully convolutional segmenter trained per pixel on a disjoint split (other scenes, from another seed), whose
  detections go through the exact judge's rules.

The caption side reads the caption's slots (the grammar's parser: category, shapes, colours, count,
relation) into learned embeddings; the image side is a CNN over soft palette channels, hackable as image
models are. All are trained on every template (train and held-out paraphrases) and every colour-shape pair,
as real reward models know more than the RL prompts use; the generator never sees the held-out ones.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .grammar import (ATTRIBUTE_ERRORS, BACKGROUND, CATEGORIES, COLORS, OPPOSITE, PALETTE, RELATIONS, SHAPES,
                      TEST_TEMPLATES, TRAIN_TEMPLATES, allowed_pairs, caption, parse_prompt, sample_meaning,
                      wrong_meaning)
from .render import IMAGE_DEGRADATIONS, check_scene_batch, degrade, render, render_labelled

__all__ = ["caption_slots", "SceneCLIP", "ScenePreference", "SceneDetector", "PairData", "make_pairs", "train_clip",
           "train_preference", "train_detector", "make_segmentation_data", "save_model", "load_model", "LEARNED"]

def caption_slots(prompts: Sequence[str]) -> torch.Tensor:
    """``[N, 7]`` slot ids of captions read by the grammar's parser: category, shape and colour of each object,
    count, relation. A position is put in one canonical direction (``B right of A`` is ``A left of B``), as a
    reader of the caption would."""
    rows = []
    for p in prompts:
        m = parse_prompt(p)
        a, b, rel = m.a, m.b, m.relation
        if rel in ("to the right of", "below"):
            a, b, rel = b, a, OPPOSITE[rel]
        rows.append([CATEGORIES.index(m.category), SHAPES.index(a.shape), _color_id(a.color),
                     0 if b is None else 1 + SHAPES.index(b.shape), _color_id(None if b is None else b.color),
                     m.count, 0 if rel is None else 1 + list(RELATIONS).index(rel)])
    return torch.tensor(rows, dtype=torch.long)


def _color_id(c: str | None) -> int:
    return 0 if c is None else 1 + COLORS.index(c)


class SlotText(nn.Module):
    """Caption slots -> vector. Each object is one token (its shape and colour together), passed through an MLP
    with its role (unordered, or the subject / reference of a position) and summed with the category, count
    and relation embeddings; then an MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.category = nn.Embedding(len(CATEGORIES), dim)
        self.obj = nn.Embedding(len(SHAPES) * (len(COLORS) + 1), dim)
        self.role = nn.Embedding(3, dim)
        self.count = nn.Embedding(5, dim)
        self.relation = nn.Embedding(len(RELATIONS) + 1, dim)
        self.obj_mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.mlp = nn.Sequential(nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        ncol = len(COLORS) + 1
        ordered = (slots[:, 6] != 0).long()
        a = self.obj_mlp(self.obj(slots[:, 1] * ncol + slots[:, 2]) + self.role(ordered))
        has_b = (slots[:, 3] > 0).float()[:, None]
        b = self.obj_mlp(self.obj((slots[:, 3] - 1).clamp(min=0) * ncol + slots[:, 4]) + self.role(2 * ordered))
        h = self.category(slots[:, 0]) + a + has_b * b + self.count(slots[:, 5]) + self.relation(slots[:, 6])
        return self.mlp(h)


def palette_channels(images: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """``[N, 3, S, S]`` in [0, 1] -> ``[N, 7, S, S]``: a soft assignment of each pixel to the background and the
    six palette colours (softmax of minus the squared distance over ``temperature``), the models' input layer."""
    ref = torch.tensor([BACKGROUND] + [PALETTE[c] for c in COLORS], dtype=images.dtype, device=images.device)
    d = ((images[:, None] - ref[None, :, :, None, None]) ** 2).sum(2)
    # channels-last: the convolutions after it run about 20% faster on CPU (the same values up to rounding)
    return torch.softmax(-d / temperature, dim=1).contiguous(memory_format=torch.channels_last)


class ImageCNN(nn.Module):
    """Image ``[N, 3, S, S]`` -> vector: three convolutions, then an MLP over the flattened map, which keeps where
    things are (positions matter) and lets the head compare them."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(7, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 48, 3, stride=2, padding=1),
                                   nn.ReLU(), nn.Conv2d(48, 64, 3, stride=2, padding=1), nn.ReLU())
        self.out = nn.Sequential(nn.Linear(64 * ((size + 3) // 4) ** 2, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.out(self.convs(palette_channels(images)).flatten(1))


class _Scorer(nn.Module):
    """Common to the learned scene models: caption slots in, a ``score(images, prompts)`` in eval mode, no grad."""

    kind = ""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.size, self.dim = size, dim

    def config(self) -> dict:
        return {"kind": self.kind, "size": self.size, "dim": self.dim}

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_scene_batch(self.kind, images, prompts, self.size)
        was = self.training
        self.eval()
        device = next(self.parameters()).device
        out = self(images.float().to(device), caption_slots(prompts).to(device)).float()
        self.train(was)
        return out


class SceneCLIP(_Scorer):
    kind = "scene_clip"

    def __init__(self, size: int = 16, dim: int = 64, scale: float = 1.0) -> None:
        super().__init__(size, dim)
        self.image, self.text = ImageCNN(size, dim), SlotText(dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.6))  # exp: the InfoNCE temperature
        self.scale = float(scale)

    def embed(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.image(images), dim=-1), F.normalize(self.text(ids), dim=-1)

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        i, t = self.embed(images, ids)
        return self.scale * (i * t).sum(-1)


class ScenePreference(SceneCLIP):
    """The HPS analogue: the contrastive model fine-tuned on preference pairs; ``r = scale * cos``."""

    kind = "scene_preference"


class SceneDetector(nn.Module):
    """The second judge (the GenEval analogue: a learned detector, then the rules): a fully convolutional
    segmenter (dilated convolutions, receptive field 15 pixels) labels each pixel background or one of the
    (shape, colour) objects; each connected region of one colour is an object whose shape is its pixels'
    majority vote; :func:`~.judge.judge_one` decides. The probability a render is correct is not its output:
    its score is 1.0 (correct) or 0.0."""

    kind = "scene_detector"

    def __init__(self, size: int = 16, dim: int = 32) -> None:
        super().__init__()
        self.size, self.dim = size, dim
        self.net = nn.Sequential(nn.Conv2d(7, dim, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(dim, dim, 3, padding=2, dilation=2), nn.ReLU(),
                                 nn.Conv2d(dim, dim, 3, padding=4, dilation=4), nn.ReLU(),
                                 nn.Conv2d(dim, 1 + len(SHAPES) * len(COLORS), 1))

    def config(self) -> dict:
        return {"kind": self.kind, "size": self.size, "dim": self.dim}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(palette_channels(images)).contiguous()

    @torch.no_grad()
    def detect(self, images: torch.Tensor, min_area: int = 3) -> list[list]:
        """Per image, the :class:`~.judge.Detection` list."""
        import numpy as np
        from scipy import ndimage

        from .judge import Detection

        device = next(self.parameters()).device
        labels = self(images.float().to(device)).argmax(1).cpu().numpy()
        ncol = len(COLORS)
        out = []
        for lab in labels:
            found = []
            color_of = np.where(lab > 0, (lab - 1) % ncol, -1)
            for ci, color in enumerate(COLORS):
                comps, n = ndimage.label(color_of == ci)
                for k in range(1, n + 1):
                    mask = comps == k
                    if mask.sum() < min_area:
                        continue
                    shape = SHAPES[int(np.bincount((lab[mask] - 1) // ncol, minlength=len(SHAPES)).argmax())]
                    ys, xs = np.nonzero(mask)
                    found.append(Detection(color, shape, int(mask.sum()), float(ys.mean()), float(xs.mean())))
            out.append(found)
        return out

    @staticmethod
    def prompt_group(prompt: str) -> str:
        """The prompt's GenEval category (``python -m g2rpo.eval`` reports the judge per category)."""
        return parse_prompt(prompt).category

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        from .judge import judge_one

        check_scene_batch(self.kind, images, prompts, self.size)
        self.eval()
        return torch.tensor([float(judge_one(parse_prompt(p), d)) for p, d in zip(prompts, self.detect(images))])


LEARNED: dict[str, type[nn.Module]] = {c.kind: c for c in (SceneCLIP, ScenePreference, SceneDetector)}


@dataclass
class PairData:
    """``n`` scenes: a correct render and caption, a negative image (wrong meaning or degraded), the caption of
    the wrong meaning (for contrastive text negatives) and each negative's kind."""

    images: torch.Tensor  # [n, 3, S, S]
    prompts: list[str]
    neg_images: torch.Tensor
    neg_kinds: list[str]
    neg_prompts: list[str]


RELATIONAL = ("position", "attribution")


def make_pairs(n: int, seed: int, size: int = 16) -> PairData:
    """Scenes over every category, template and colour-shape pair; deterministic given ``seed``."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    pairs = allowed_pairs(True)
    images, prompts, negs, kinds, neg_prompts = [], [], [], [], []
    for i in range(n):
        m = sample_meaning(rng, CATEGORIES[i % len(CATEGORIES)], pairs)
        template = rng.choice(TRAIN_TEMPLATES[m.category] + TEST_TEMPLATES[m.category])
        img = render(m, rng, size, pairs)
        wrong = wrong_meaning(m, rng.choice(ATTRIBUTE_ERRORS[m.category]), rng)
        # three in four negatives are wrong scenes (the hard ones), one in four a degraded render; a relation error
        # (position, attribution: what a two-tower model finds hardest to bind) is drawn twice as often
        errors = ATTRIBUTE_ERRORS[m.category]
        kind = rng.choice(errors + tuple(e for e in errors if e in RELATIONAL) if rng.random() < 0.75
                          else IMAGE_DEGRADATIONS)
        if kind in IMAGE_DEGRADATIONS:
            neg = degrade(torch.from_numpy(img), kind, g).numpy()
        else:
            neg = render(wrong_meaning(m, kind, rng), rng, size, pairs)
        images.append(img)
        prompts.append(caption(m, template))
        negs.append(neg)
        kinds.append(kind)
        neg_prompts.append(caption(wrong, template))
    return PairData(torch.from_numpy(__import__("numpy").stack(images)), prompts,
                    torch.from_numpy(__import__("numpy").stack(negs)), kinds, neg_prompts)


_CHANNEL_ORDERS = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]


def _color_maps() -> list[torch.Tensor]:
    """For each RGB channel order: the palette is mapped onto itself; slot id -> slot id of the recoloured."""
    maps = []
    for order in _CHANNEL_ORDERS:
        table = [0]
        for c in COLORS:
            rgb = tuple(PALETTE[c][i] for i in order)
            table.append(1 + [PALETTE[k] for k in COLORS].index(rgb))
        maps.append(torch.tensor(table))
    return maps


_COLOR_MAPS = _color_maps()
_LEFT = 1 + list(RELATIONS).index("to the left of")


def augment(images: list[torch.Tensor], slots: list[torch.Tensor], g: torch.Generator
            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The same label-preserving change for a batch's images and caption slots: a channel order (the palette
    maps onto itself, the captions' colours with it) and a horizontal flip (left and right trade places)."""
    k = int(torch.randint(0, len(_CHANNEL_ORDERS), (1,), generator=g))
    flip = bool(torch.randint(0, 2, (1,), generator=g))
    order, table = list(_CHANNEL_ORDERS[k]), _COLOR_MAPS[k]
    out_i = [x[:, order].flip(-1) if flip else x[:, order] for x in images]
    out_s = []
    for sl in slots:
        sl = sl.clone()
        sl[:, 2], sl[:, 4] = table[sl[:, 2]], table[sl[:, 4]]
        if flip:  # "A left of B" becomes "B left of A"
            rows = (sl[:, 6] == _LEFT).nonzero()[:, 0]
            a, b = sl[rows][:, [1, 2]], sl[rows][:, [3, 4]]
            sl[rows[:, None], torch.tensor([1, 2])] = b - torch.tensor([1, 0])
            sl[rows[:, None], torch.tensor([3, 4])] = a + torch.tensor([1, 0])
        out_s.append(sl)
    return out_i, out_s


def _batches(n: int, batch: int, steps: int, seed: int, opt: torch.optim.Optimizer):
    """Random minibatch indices; the optimizer's learning rate follows a one-cycle schedule over ``steps``."""
    g = torch.Generator().manual_seed(seed)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[grp["lr"] for grp in opt.param_groups],
                                                total_steps=steps, pct_start=0.15)
    for _ in range(steps):
        yield torch.randint(0, n, (batch,), generator=g)
        sched.step()


def _own_negative_loss(logits: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry on each caption's own pair: ``logits [n, 2n]`` (caption i against the n correct images, then
    the n negatives, in row order), ``-log sigmoid(logits[i, i] - logits[i, n + i])`` averaged."""
    n = logits.shape[0]
    return -F.logsigmoid(logits[:, :n].diagonal() - logits[:, n:].diagonal()).mean()


def train_clip(data: PairData, size: int, steps: int, seed: int, batch: int = 128, lr: float = 2e-3,
               pair_weight: float = 0.0) -> SceneCLIP:
    """InfoNCE both ways; each row's wrong caption and negative image are extra negatives (NegCLIP-style), and
    ``pair_weight`` adds the Bradley-Terry term ``-log sigmoid(s * (cos(t, correct) - cos(t, negative)))`` on each
    caption's own hard negative: InfoNCE alone spends little of its gradient on the one swapped render among a
    batch of easy negatives, and ranks position errors badly."""
    torch.manual_seed(seed)
    model = SceneCLIP(size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    pos, neg = caption_slots(data.prompts), caption_slots(data.neg_prompts)
    g = torch.Generator().manual_seed(seed + 1)
    for idx in _batches(len(data.prompts), batch, steps, seed, opt):
        (xp, xn), (sp, sn) = augment([data.images[idx], data.neg_images[idx]], [pos[idx], neg[idx]], g)
        i_pos, t_pos = model.embed(xp, sp)
        i_neg, t_neg = model.embed(xn, sn)
        s = model.logit_scale.exp().clamp(max=100)
        target = torch.arange(len(idx))
        i2t = s * i_pos @ torch.cat([t_pos, t_neg]).T
        t2i = s * t_pos @ torch.cat([i_pos, i_neg]).T
        loss = (F.cross_entropy(i2t, target) + F.cross_entropy(t2i, target)) / 2
        if pair_weight:
            loss = loss + pair_weight * _own_negative_loss(t2i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def train_preference(data: PairData, size: int, steps: int, seed: int, init: SceneCLIP, batch: int = 128,
                     lr: float = 1e-3) -> ScenePreference:
    """``init`` (the contrastive model) fine-tuned as HPS fine-tunes CLIP: Bradley-Terry on each pair,
    ``-log sigmoid(t * (cos(correct) - cos(negative)))`` for the same caption, plus its listwise form
    (Plackett-Luce): the caption's render preferred over every other image of the batch."""
    torch.manual_seed(seed)
    model = ScenePreference(size, init.dim)
    model.load_state_dict(init.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    slots = caption_slots(data.prompts)
    g = torch.Generator().manual_seed(seed + 1)
    for idx in _batches(len(data.prompts), batch, steps, seed, opt):
        (xp, xn), (ids,) = augment([data.images[idx], data.neg_images[idx]], [slots[idx]], g)
        n = len(idx)
        i, t = model.embed(torch.cat([xp, xn]), ids)
        r = model.logit_scale.exp().clamp(max=100) * t @ i.T  # [captions, 2n images]
        loss = _own_negative_loss(r) + F.cross_entropy(r, torch.arange(n))  # the pair and its listwise form
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def make_segmentation_data(n: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` renders over every category and pair with their label maps (the detector's split: its own seed)."""
    import numpy as np

    rng = random.Random(seed)
    pairs = allowed_pairs(True)
    out = [render_labelled(sample_meaning(rng, CATEGORIES[i % len(CATEGORIES)], pairs), rng, size, pairs)
           for i in range(n)]
    return torch.from_numpy(np.stack([o[0] for o in out])), torch.from_numpy(np.stack([o[1] for o in out]))


def train_detector(images: torch.Tensor, labels: torch.Tensor, size: int, steps: int, seed: int, batch: int = 64,
                   lr: float = 4e-3) -> SceneDetector:
    """Per-pixel cross-entropy (object pixels weighted 4x: they are few), with the channel-order and flip
    augmentation (labels recoloured and mirrored alike)."""
    torch.manual_seed(seed)
    model = SceneDetector(size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed + 1)
    ncol = len(COLORS)
    weight = torch.full((1 + len(SHAPES) * ncol,), 4.0)
    weight[0] = 1.0
    for idx in _batches(len(images), batch, steps, seed, opt):
        k = int(torch.randint(0, len(_CHANNEL_ORDERS), (1,), generator=g))
        x, y = images[idx][:, list(_CHANNEL_ORDERS[k])], labels[idx]
        col = _COLOR_MAPS[k][torch.where(y > 0, (y - 1) % ncol + 1, 0)]  # colour slot ids, recoloured
        y = torch.where(y > 0, (y - 1) // ncol * ncol + col, 0)
        if bool(torch.randint(0, 2, (1,), generator=g)):
            x, y = x.flip(-1), y.flip(-1)
        loss = F.cross_entropy(model(x), y, weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def save_model(model: _Scorer, folder: str | Path) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config() | ({"scale": model.scale} if isinstance(model, SceneCLIP) else {})
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))


def load_model(folder: str | Path, **options) -> _Scorer:
    """A learned scene model from its folder (tensors only: safetensors and JSON, nothing that runs code)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for f in ("config.json", "model.safetensors"):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"scene model: missing {folder / f} (rebuild with `python -m g2rpo.lab "
                                    "build --world scenes`)")
    cfg = json.loads((folder / "config.json").read_text())
    kind = cfg.pop("kind", None)
    if kind not in LEARNED:
        raise ValueError(f"{folder / 'config.json'}: unknown scene model kind {kind!r}")
    cfg.update(options)
    model = LEARNED[kind](**cfg)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()
