"""Text prompts of the lab world and its learned prompt encoder.

Every class has a few paraphrases; the built-in prompt file (``lab_prompts.txt``) holds
the training prompts and ``lab_prompts_test.txt`` one held-out paraphrase per class. The
:class:`LabTextEncoder` turns prompts into the conditioning the Flux adapter takes: a
token sequence ``prompt_embeds [B, L, D]`` (like T5's) and a ``pooled_prompt_embeds
[B, Dp]`` vector (like CLIP's pooled output); it is learned with the generator.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

__all__ = ["CLASS_NAMES", "TEMPLATES", "TEST_TEMPLATE", "prompt_label", "class_prompts", "builtin_prompt_file",
           "LabTextEncoder"]

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten digit {name}",
    "the number {name} written by hand",
    "a scanned image of the digit {d}",
    "digit {name}",
)
TEST_TEMPLATE = "a small picture of a handwritten {name}"


def class_prompts(label: int, test: bool = False) -> list[str]:
    """The paraphrases of class ``label`` (the held-out one with ``test=True``)."""
    templates = (TEST_TEMPLATE,) if test else TEMPLATES
    return [t.format(name=CLASS_NAMES[label], d=label) for t in templates]


def prompt_label(prompt: str) -> int:
    """The class a lab prompt asks for (its number word or digit)."""
    words = re.findall(r"[a-z]+|\d", prompt.lower())
    found = {CLASS_NAMES.index(w) for w in words if w in CLASS_NAMES} | {int(w) for w in words if w.isdigit()}
    if len(found) != 1:
        raise ValueError(f"cannot tell which digit the prompt {prompt!r} asks for")
    return found.pop()


def builtin_prompt_file(test: bool = False) -> Path:
    """Path of the built-in prompt file shipped with the package (``builtin:lab`` / ``builtin:lab_test``)."""
    from ..prompts import builtin_prompt_path

    return builtin_prompt_path("lab_test" if test else "lab")


def _tokens(prompt: str) -> list[str]:
    return re.findall(r"[a-z]+|\d", prompt.lower())


class LabTextEncoder(torch.nn.Module):
    """A learned word-level prompt encoder: ``encode(prompts) -> {prompt_embeds, pooled_prompt_embeds}``.

    Unknown words map to ``<unk>``; sequences are padded to ``max_length`` with ``<pad>``.
    Saved as ``config.json`` + ``model.safetensors`` in a folder.
    """

    def __init__(self, vocab: list[str], dim: int = 32, pooled_dim: int = 32, max_length: int = 8) -> None:
        super().__init__()
        self.vocab = ["<pad>", "<unk>"] + [w for w in vocab if w not in ("<pad>", "<unk>")]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.dim, self.pooled_dim, self.max_length = dim, pooled_dim, max_length
        self.embed = torch.nn.Embedding(len(self.vocab), dim)
        self.position = torch.nn.Parameter(torch.zeros(max_length, dim))
        self.pool = torch.nn.Linear(dim, pooled_dim)

    @classmethod
    def from_prompts(cls, prompts: list[str], **kwargs) -> "LabTextEncoder":
        vocab = sorted({w for p in prompts for w in _tokens(p)})
        return cls(vocab, **kwargs)

    def token_ids(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for i, p in enumerate(prompts):
            toks = [self.index.get(w, 1) for w in _tokens(p)][: self.max_length]
            ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        return ids, ids != 0

    def forward(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        ids, mask = self.token_ids(prompts)
        ids, mask = ids.to(self.position.device), mask.to(self.position.device)
        seq = self.embed(ids) + self.position
        m = mask.unsqueeze(-1).float()
        pooled = self.pool((seq * m).sum(1) / m.sum(1).clamp(min=1.0))
        return {"prompt_embeds": seq, "pooled_prompt_embeds": pooled}

    encode = forward

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {"vocab": self.vocab, "dim": self.dim, "pooled_dim": self.pooled_dim, "max_length": self.max_length}
        (folder / "config.json").write_text(json.dumps(cfg, indent=1))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "LabTextEncoder":
        from safetensors.torch import load_file

        folder = Path(folder)
        for f in ("config.json", "model.safetensors"):
            if not (folder / f).is_file():
                raise FileNotFoundError(f"lab text encoder: missing {folder / f}")
        cfg = json.loads((folder / "config.json").read_text())
        enc = cls(cfg["vocab"], cfg["dim"], cfg["pooled_dim"], cfg["max_length"])
        enc.load_state_dict(load_file(str(folder / "model.safetensors")))
        return enc
