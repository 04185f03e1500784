"""Clear errors for missing local model files (nothing is ever downloaded): what each kind needs.

No heavy imports: the trainer checks these files before any model (or diffusers) loads.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["MODEL_FILES", "require_files"]

_BASE = ["model_index.json", "transformer/config.json", "vae/config.json", "text_encoder/config.json"]
#: The files a local diffusers folder of each model kind must hold (checked before loading, and by the
#: trainer's preflight before any model loads).
MODEL_FILES = {"flux": _BASE + ["text_encoder_2/config.json"],
               "sd3": _BASE + ["text_encoder_2/config.json", "text_encoder_3/config.json"],
               "flux2": _BASE, "qwen_image": _BASE, "wan": _BASE}


def require_files(root: Path, relative: list[str], what: str) -> None:
    """Raise FileNotFoundError naming every missing file under ``root``."""
    if not root.is_dir():
        raise FileNotFoundError(f"{what}: model folder not found: {root}")
    missing = [str(root / r) for r in relative if not (root / r).exists()]
    if missing:
        raise FileNotFoundError(f"{what}: missing files in {root}: {', '.join(missing)}")
