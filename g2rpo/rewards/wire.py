"""How images travel between a reward client and a reward server: float32 or uint8 arrays (lossless, base64)
or PNG files (uint8, smaller). One encoder and one decoder, shared by ``serve`` and ``remote``."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch

__all__ = ["decode_images", "encode_images", "png_data_url", "WireError"]


class WireError(ValueError):
    """A malformed image payload (named, never a crash)."""


def encode_images(images: torch.Tensor, fmt: str = "raw") -> dict:
    """``images [N, C, H, W]`` (or ``[N, H, W]``) in [0, 1] as a JSON-able payload: ``raw`` float32 (exact) or
    ``png`` (uint8, as the rewards' own PIL conversion rounds)."""
    x = images.detach().float().cpu().contiguous()
    if fmt == "raw":
        return {"format": "raw", "dtype": "float32", "shape": list(x.shape),
                "data": base64.b64encode(x.numpy().tobytes()).decode()}
    if fmt == "png":
        from PIL import Image

        arr = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        arr = arr[:, None] if arr.ndim == 3 else arr
        files = []
        for a in arr.permute(0, 2, 3, 1).numpy():
            buf = io.BytesIO()
            Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="PNG")
            files.append(base64.b64encode(buf.getvalue()).decode())
        return {"format": "png", "channels": int(arr.shape[1]), "data": files}
    raise ValueError(f"format must be raw or png, got {fmt!r}")


def decode_images(payload: object) -> torch.Tensor:
    """The tensor an :func:`encode_images` payload holds; WireError names what is wrong."""
    if not isinstance(payload, dict):
        raise WireError("images must be an object with format, data (and shape, dtype for raw)")
    fmt = payload.get("format")
    if fmt == "raw":
        shape, dtype = payload.get("shape"), payload.get("dtype", "float32")
        if dtype not in ("float32", "uint8"):
            raise WireError(f"images.dtype must be float32 or uint8, got {dtype!r}")
        if not (isinstance(shape, list) and len(shape) in (3, 4) and all(isinstance(s, int) and s > 0 for s in shape)):
            raise WireError(f"images.shape must be [N, C, H, W] or [N, H, W] of positive ints, got {shape!r}")
        try:
            raw = base64.b64decode(payload.get("data", ""), validate=True)
        except (ValueError, TypeError) as err:
            raise WireError(f"images.data is not base64: {err}") from None
        np_dtype = np.float32 if dtype == "float32" else np.uint8
        expected = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
        if len(raw) != expected:
            raise WireError(f"images.data holds {len(raw)} bytes, shape {shape} x {dtype} needs {expected}")
        arr = torch.from_numpy(np.frombuffer(raw, dtype=np_dtype).reshape(shape).copy())
        return arr.float() / 255.0 if dtype == "uint8" else arr
    if fmt == "png":
        from PIL import Image, UnidentifiedImageError

        files = payload.get("data")
        if not isinstance(files, list) or not files:
            raise WireError("images.data must be a non-empty list of base64 PNG files")
        out = []
        for i, f in enumerate(files):
            try:
                img = Image.open(io.BytesIO(base64.b64decode(f, validate=True)))
                img.load()
            except (ValueError, TypeError, UnidentifiedImageError, OSError) as err:
                raise WireError(f"images.data[{i}] is not a base64 PNG: {err}") from None
            arr = torch.from_numpy(np.asarray(img.convert("L" if payload.get("channels") == 1 else "RGB")).copy())
            out.append(arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1))
        if len({tuple(o.shape) for o in out}) != 1:
            raise WireError("images.data: every PNG in one request must have the same size")
        return torch.stack(out).float() / 255.0
    raise WireError(f"images.format must be raw or png, got {fmt!r}")


def png_data_url(image: torch.Tensor) -> str:
    """One ``[C, H, W]`` image in [0, 1] as a ``data:image/png;base64,...`` URL (OpenAI chat content)."""
    return "data:image/png;base64," + encode_images(image[None], "png")["data"][0]
