"""Lab rewards (trained on) and out-of-domain judges (evaluation only).

In-domain rewards, same protocol as the real reward models:

* ``digit_alignment`` — probability of the prompted class under a multinomial logistic
  regression trained on the train split (the analogue of CLIP score). Easily hacked:
  saturated non-digit patterns can score high.
* ``digit_realism`` — minus the RMS pixel distance to the nearest real *train* digit
  (penalises the saturated hack).

Judges, never trained on (evaluation only): an RBF-SVM classifier trained on the
disjoint ``val`` split (accuracy on generated images), realism as the RMS distance to
the nearest real *val* digit (never the reward's train reference), and diversity as
the mean pairwise RMS distance within a prompt's samples.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC

from ..rewards.diversity import pairwise_distance_mean
from .data import DigitSplits, load_splits, to_unit
from .generator import LabWorldConfig
from .prompts import prompt_label

__all__ = ["DigitAlignment", "DigitRealism", "OODJudge", "DigitJudge", "build_judge", "fit_alignment", "diversity",
           "nearest_distance"]


def _flat_unit(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as ``[N, H*W]`` float32 ([N, H, W] or [N, 1, H, W])."""
    if images.ndim == 4:
        if images.shape[1] != 1:
            raise ValueError(f"lab images have one channel, got shape {tuple(images.shape)}")
        images = images[:, 0]
    if images.ndim != 3:
        raise ValueError(f"lab images must be [N, H, W] or [N, 1, H, W], got shape {tuple(images.shape)}")
    return images.float().reshape(images.shape[0], -1)


def _labels(prompts: Sequence[str], n: int) -> torch.Tensor:
    if len(prompts) != n:
        raise ValueError(f"got {n} images but {len(prompts)} prompts")
    return torch.tensor([prompt_label(p) for p in prompts], dtype=torch.long)


def nearest_distance(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """RMS pixel distance of each image ([N, D] in [0, 1]) to its nearest reference image."""
    d = torch.cdist(images.double(), reference.double())
    return (d.min(dim=1).values / images.shape[1] ** 0.5).float()


def fit_alignment(splits: DigitSplits, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on the train split (features: pixels in [0, 1])."""
    x = to_unit(splits.train_x).reshape(len(splits.train_y), -1).numpy()
    clf = LogisticRegression(C=1.0, max_iter=3000, random_state=seed).fit(x, splits.train_y.numpy())
    return (torch.from_numpy(np.ascontiguousarray(clf.coef_, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(clf.intercept_, dtype=np.float32)))


class DigitAlignment:
    """P(prompted class | image) under the train-split logistic regression."""

    name = "digit_alignment"

    def __init__(self, coef: torch.Tensor, intercept: torch.Tensor) -> None:
        self.coef, self.intercept = coef.float(), intercept.float()

    @torch.no_grad()
    def probs(self, images: torch.Tensor) -> torch.Tensor:
        x = _flat_unit(images)
        if x.shape[1] != self.coef.shape[1]:
            raise ValueError(f"alignment reward expects {self.coef.shape[1]} pixels, got {x.shape[1]}")
        return torch.softmax(x @ self.coef.T + self.intercept, dim=1)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        labels = _labels(prompts, images.shape[0])
        return self.probs(images).gather(1, labels[:, None])[:, 0]


class DigitRealism:
    """Minus the RMS distance to the nearest real train digit (higher = more realistic)."""

    name = "digit_realism"

    def __init__(self, reference: torch.Tensor) -> None:
        self.reference = reference.float()

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        x = _flat_unit(images)
        if len(prompts) != x.shape[0]:
            raise ValueError(f"got {x.shape[0]} images but {len(prompts)} prompts")
        return -nearest_distance(x, self.reference)


def diversity(images: torch.Tensor, groups: torch.Tensor) -> float:
    """Mean over groups (e.g. prompts) of the mean pairwise RMS distance within the group."""
    x = _flat_unit(images)
    vals = [pairwise_distance_mean(x[groups == g]) for g in torch.unique(groups) if int((groups == g).sum()) >= 2]
    if not vals:
        raise ValueError("diversity needs at least one group with two images")
    return float(np.mean(vals))


class OODJudge:
    """Out-of-domain evaluation: RBF-SVM accuracy and nearest-neighbour realism (both on the val split), diversity."""

    def __init__(self, splits: DigitSplits) -> None:
        self.classifier = SVC(gamma="scale").fit(to_unit(splits.val_x).reshape(len(splits.val_y), -1).numpy(),
                                                 splits.val_y.numpy())
        self.reference = to_unit(splits.val_x).reshape(len(splits.val_y), -1)

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None = None) -> dict[str, float]:
        x = _flat_unit(images)
        pred = torch.from_numpy(self.classifier.predict(x.numpy()))
        out = {
            "judge_accuracy": float((pred == labels.cpu()).float().mean()),
            "judge_realism": float(-nearest_distance(x, self.reference).mean()),
        }
        if groups is not None:
            out["diversity"] = diversity(images, groups)
        return out


class DigitJudge:
    """The out-of-domain judge as a reward (``digit_judge``): 1.0 where the judge's classifier (an RBF-SVM on the
    val split, never trained on) reads the digit the prompt asks for, else 0.0; its mean is ``judge_accuracy``."""

    name = "digit_judge"

    def __init__(self, judge: OODJudge) -> None:
        self.judge = judge

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = _flat_unit(images)
        if len(prompts) != x.shape[0]:
            raise ValueError(f"got {x.shape[0]} images but {len(prompts)} prompts")
        pred = torch.from_numpy(self.judge.classifier.predict(x.numpy()))
        return (pred == torch.tensor([prompt_label(p) for p in prompts])).float()


def build_judge(world: str | Path | None = None, seed: int = 0, image_size: int = 8) -> DigitJudge:
    """``digit_judge`` of a built lab world (its val split), or of the splits of (seed, image_size)."""
    if world is not None:
        cfg = config_of(Path(world))
        seed, image_size = cfg.seed, cfg.image_size
    return DigitJudge(OODJudge(load_splits(seed, image_size)))


def build_alignment(world: str | Path | None = None, seed: int = 0, image_size: int = 8) -> DigitAlignment:
    """From a built lab world's saved weights, or fitted afresh for (seed, image_size)."""
    if world is not None:
        return load_rewards(world)["digit_alignment"]
    return DigitAlignment(*fit_alignment(load_splits(seed, image_size), seed))


def build_realism(world: str | Path | None = None, seed: int = 0, image_size: int = 8) -> DigitRealism:
    if world is not None:
        return load_rewards(world)["digit_realism"]
    s = load_splits(seed, image_size)
    return DigitRealism(to_unit(s.train_x).reshape(len(s.train_y), -1))


def config_of(folder: Path) -> LabWorldConfig:
    """The :class:`LabWorldConfig` saved in a lab model folder."""
    f = Path(folder) / "lab_world.json"
    if not f.is_file():
        raise FileNotFoundError(f"{folder} is not a lab model folder: missing {f.name}")
    return LabWorldConfig(**json.loads(f.read_text()))


def load_rewards(world: str | Path) -> dict[str, object]:
    """The in-domain rewards of a built world: ``digit_alignment``, ``digit_realism``."""
    from safetensors.torch import load_file

    world = Path(world)
    cfg = config_of(world)
    f = world / "rewards" / "digit_alignment.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"missing reward weights {f}: rebuild with `python -m g2rpo.lab build`")
    w = load_file(str(f))
    s = load_splits(cfg.seed, cfg.image_size)
    return {"digit_alignment": DigitAlignment(w["coef"], w["intercept"]),
            "digit_realism": DigitRealism(to_unit(s.train_x).reshape(len(s.train_y), -1))}
