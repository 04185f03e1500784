"""Clear errors for missing local model files (nothing is ever downloaded)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["require_files"]


def require_files(root: Path, relative: list[str], what: str) -> None:
    """Raise FileNotFoundError naming every missing file under ``root``."""
    if not root.is_dir():
        raise FileNotFoundError(f"{what}: model folder not found: {root}")
    missing = [str(root / r) for r in relative if not (root / r).exists()]
    if missing:
        raise FileNotFoundError(f"{what}: missing files in {root}: {', '.join(missing)}")
