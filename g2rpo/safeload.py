"""Torch files loaded without running code: ``torch.load(weights_only=True)`` (tensors and plain containers
only), with an error that names the file and what it tried to load when it holds anything else.

Every ``.pt`` g2rpo reads goes through :func:`load_torch_file`: its own checkpoints' trainer state and RNG files,
HPS-v2 and ImageReward checkpoints. A pickle can name any Python callable to rebuild an object; unpickled with
``weights_only=False`` a crafted file runs its payload on load. Nothing g2rpo writes needs more than tensors and
containers; the one extra allowed (``allow``) is numpy's array rebuild, for RNG files written before the
numpy state was stored as tensors.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["UnsafeFileError", "load_torch_file", "numpy_array_globals"]


class UnsafeFileError(ValueError):
    """A torch file holds objects other than tensors and plain containers: refused, nothing in it ran."""


def numpy_array_globals() -> list[Any]:
    """What a pickled numpy array (``np.random.get_state()``'s keys) needs: its rebuild function and types."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_torch_file(path: str | Path, what: str, allow: Sequence[Any] = (), map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``, plus the globals in ``allow``. UnsafeFileError naming ``what``
    (e.g. "HPS checkpoint") and the file when it pickles anything else; other failures (a truncated or foreign
    file) propagate as torch raises them."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL)\s+([\w.]+)", str(err))
        if found is None:  # not a pickle of objects at all (a cut or random file): damaged, nothing ran
            detail = next((line for line in str(err).splitlines() if line.startswith("Unsupported")), "")
            raise ValueError(f"{what} {path}: not a readable torch file" + (f" ({detail})" if detail else "")) \
                from None
        name = f" ({found.group(1)})"
        raise UnsafeFileError(f"{what} {path}: refused: it holds a pickled object{name} besides tensors and plain "
                              "containers, which could run code when loaded; g2rpo loads no such file (a crafted "
                              "file, or one saved with whole Python objects: save its state_dict instead)") from None
