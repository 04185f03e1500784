"""Prompt files: ``.txt`` (one prompt per line), ``.jsonl`` / ``.json`` (HPSv2 style: strings or
objects with a ``prompt`` or ``caption`` field), ``.csv`` (a ``prompt`` column), or ``builtin:lab`` /
``builtin:lab_test``.

Image-to-video prompt files (``.jsonl``, ``.json`` or ``.csv``) also name a conditioning ``image`` per prompt and
optionally a ``last_image``, paths relative to the file's folder: :func:`load_prompt_images` reads and checks them.

:class:`PromptSchedule` gives every iteration its global prompt list: the dataset is
reshuffled each epoch with the training seed, so iteration ``i`` always sees the same
prompts whatever the number of ranks, and resuming needs only ``i``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["BUILTIN_PROMPTS", "ImagePrompt", "builtin_prompt_path", "check_image", "image_prompts", "load_prompt_images", "load_prompts",
           "PromptSchedule"]

#: The built-in prompt sets (``builtin:NAME``): text files shipped in ``g2rpo/data/prompts/``.
BUILTIN_PROMPTS = Path(__file__).resolve().parent / "data" / "prompts"


def builtin_prompt_path(name: str) -> Path:
    """The file of built-in prompt set ``name``; ValueError lists the sets."""
    path = BUILTIN_PROMPTS / f"{name}.txt"
    if not name or "/" in name or not path.is_file():
        known = ", ".join(f"builtin:{p.stem}" for p in sorted(BUILTIN_PROMPTS.glob("*.txt")))
        raise ValueError(f"unknown built-in prompt set 'builtin:{name}': use {known}")
    return path


def _from_item(item: object, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in ("prompt", "caption", "text"):
            if isinstance(item.get(key), str):
                return item[key]
    raise ValueError(f"{where}: expected a string or an object with a 'prompt'/'caption' field, got {item!r}")


def _path_of(spec: str) -> Path:
    path = builtin_prompt_path(spec.split(":", 1)[1]) if spec.startswith("builtin:") else Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    return path


def _records(path: Path) -> list[tuple[str, object]]:
    """``(where, item)`` for every entry of a structured prompt file (.jsonl, .json, .csv)."""
    text = path.read_text(encoding="utf-8-sig")  # a UTF-8 BOM (Windows editors) is not part of the first prompt
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    out.append((f"{path}:{i + 1}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{i + 1}: not JSON ({err.msg})") from None
        return out
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json prompt file must hold a list")
        return [(f"{path}[{i}]", item) for i, item in enumerate(data)]
    if path.suffix == ".csv":
        import csv
        import io

        reader = csv.DictReader(io.StringIO(text))
        if "prompt" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: a .csv prompt file needs a 'prompt' column, got {reader.fieldnames}")
        return [(f"{path}:{i + 2}", {k: v for k, v in row.items() if v not in (None, "")})
                for i, row in enumerate(reader)]
    raise ValueError(f"{path}: not a structured prompt file (.jsonl, .json or .csv)")


def load_prompts(spec: str) -> list[str]:
    """Read prompts from a file or a ``builtin:`` name; a missing or empty source raises."""
    path = _path_of(spec)
    if path.suffix in (".jsonl", ".json", ".csv"):
        prompts = [_from_item(item, where) for where, item in _records(path)]
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


@dataclass(frozen=True)
class ImagePrompt:
    """An image-to-video prompt's conditioning image and optional last image."""

    image: Path
    last_image: Path | None = None


def check_image(path: Path, where: str) -> Path:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"{where}: image not found: {path}")
    try:
        with Image.open(path) as im:
            im.verify()  # reads the whole file: a truncated or corrupt image fails here, before any model loads
    except Image.DecompressionBombError as err:
        raise ValueError(f"{where}: image {path} is too large to read safely ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{where}: unreadable image {path}: {err}") from None
    return path


#: PIL modes of more than 8 bits per channel, and the value their full scale reads as
_HIGH_DEPTH = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def read_image(path: str | Path):
    """An RGB ``PIL.Image`` as ``diffusers.utils.load_image`` reads a file (what users give ``pipe(image=...)``):
    its EXIF orientation applied, then converted to RGB; a 16-bit greyscale image is scaled to 8 bits (PIL's own
    conversion clips it, and a mid-grey 16-bit PNG turns white)."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        image = ImageOps.exif_transpose(im)
        image.load()
    if image.mode in _HIGH_DEPTH:
        values = np.asarray(image, dtype=np.float64)
        if values.max(initial=0) > _HIGH_DEPTH[image.mode] or values.min(initial=0) < 0:
            raise ValueError(f"{path}: a {image.mode} image with values outside 0..{_HIGH_DEPTH[image.mode]} "
                             "(not a 16-bit picture); save it as an 8-bit RGB image")
        image = Image.fromarray(np.round(values * 255.0 / _HIGH_DEPTH[image.mode]).astype(np.uint8), mode="L")
    return image.convert("RGB")


def image_prompts(entries: Iterable[tuple[str, str, Path, Path | None]]) -> dict[str, ImagePrompt]:
    """``{prompt: ImagePrompt}`` from ``(where, prompt, image, last image or None)`` entries: every image opened and
    verified (:func:`check_image`); one prompt given two different images raises, naming ``where``."""
    out: dict[str, ImagePrompt] = {}
    for where, prompt, image, last in entries:
        entry = ImagePrompt(check_image(image, where), None if last is None else check_image(last, where))
        if out.get(prompt, entry) != entry:
            raise ValueError(f"{where}: prompt {prompt!r} is given two different images ({out[prompt].image} and "
                             f"{entry.image}); image-to-video prompts must be distinct per image")
        out[prompt] = entry
    return out


def load_prompt_images(spec: str) -> dict[str, ImagePrompt]:
    """``{prompt: ImagePrompt}`` from an image-to-video prompt file (``.jsonl`` / ``.json`` objects or ``.csv`` rows
    with ``prompt``, ``image`` and optionally ``last_image``; paths relative to the file's folder). Every image is
    opened and verified; a prompt without an image, a missing or unreadable image, or one prompt given two
    different images raise, naming the line."""
    path = _path_of(spec)
    if path.suffix not in (".jsonl", ".json", ".csv"):
        raise ValueError(f"{path}: image-to-video prompts need a .jsonl, .json or .csv file with 'prompt' and "
                         "'image' fields (a text file has no images)")
    def entries():
        for where, item in _records(path):
            prompt = _from_item(item, where).strip()
            if not isinstance(item, dict) or not isinstance(item.get("image"), str) or not item["image"].strip():
                raise ValueError(f"{where}: image-to-video prompts need an 'image' field (a path), got {item!r}")
            last = item.get("last_image")
            yield (where, prompt, path.parent / item["image"].strip(),
                   path.parent / last.strip() if isinstance(last, str) and last.strip() else None)

    out = image_prompts(entries())
    if not out:
        raise ValueError(f"prompt file {path} holds no prompts")
    return out


class PromptSchedule:
    """Deterministic global prompt order: epoch ``e`` is a permutation seeded by ``(seed, e)``."""

    def __init__(self, prompts: list[str], seed: int, shuffle: bool = True) -> None:
        self.prompts, self.seed, self.shuffle = prompts, seed, shuffle
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            n = len(self.prompts)
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(n) if self.shuffle else np.arange(n)
        return self._perms[epoch]

    def indices(self, iteration: int, per_iteration: int) -> list[int]:
        """Global positions ``iteration * n .. (iteration + 1) * n - 1`` of the stream."""
        return list(range(iteration * per_iteration, (iteration + 1) * per_iteration))

    def prompt_at(self, position: int) -> str:
        n = len(self.prompts)
        return self.prompts[int(self._perm(position // n)[position % n])]
