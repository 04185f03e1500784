"""How images travel between a reward client and a reward server: float32 or uint8 arrays (lossless, base64)
or PNG files (uint8, smaller). One encoder and one decoder, shared by ``serve`` and ``remote``."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Limits", "LimitError", "decode_images", "decode_png", "encode_images", "png_data_url", "WireError"]


class WireError(ValueError):
    """A malformed image payload (named, never a crash)."""


class LimitError(WireError):
    """A request over one of the server's :class:`Limits` (refused before anything is decoded)."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask of a reward server; each checked before anything is decoded, each raisable
    (``python -m g2rpo.rewards.serve --max-body-mb ...``)."""

    max_body_bytes: int = 64 * 2**20
    max_images: int = 256  # per request
    max_pixels: int = 4096 * 4096  # per image
    max_tokens: int = 1024  # a judge's answer

    def check_count(self, n: int, where: str = "images", noun: str = "images") -> None:
        """LimitError when a request holds more than ``max_images`` images (or prompts, one per image)."""
        if n > self.max_images:
            raise LimitError(f"{where}: {n} {noun}, over the server's limit of {self.max_images} per request "
                             "(--max-images)")

    def check_pixels(self, height: int, width: int, where: str = "images") -> None:
        """LimitError when one image has more than ``max_pixels`` pixels (Python ints: no overflow)."""
        if height * width > self.max_pixels:
            raise LimitError(f"{where}: {height}x{width} pixels per image, over the server's limit of "
                             f"{self.max_pixels} (--max-pixels)")


def decode_png(b64: object, limits: Limits, where: str):
    """One base64 PNG (or any PIL image file) as a loaded ``PIL.Image``: its size read from the header and checked
    against ``limits`` before the pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    except Image.DecompressionBombError as err:
        raise LimitError(f"{where}: {err}") from None
    except (ValueError, TypeError, UnidentifiedImageError, OSError) as err:
        raise WireError(f"{where} is not a base64 PNG: {err}") from None
    limits.check_pixels(img.height, img.width, where)
    try:
        img.load()
    except (ValueError, OSError) as err:
        raise WireError(f"{where} is not a readable image: {err}") from None
    return img


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


def decode_images(payload: object, limits: Limits | None = None) -> torch.Tensor:
    """The tensor an :func:`encode_images` payload holds; WireError names what is wrong, LimitError a payload over
    ``limits`` (checked on its shape or PNG headers, before decoding)."""
    limits = limits or Limits()
    if not isinstance(payload, dict):
        raise WireError("images must be an object with format, data (and shape, dtype for raw)")
    fmt = payload.get("format")
    if fmt == "raw":
        shape, dtype = payload.get("shape"), payload.get("dtype", "float32")
        if dtype not in ("float32", "uint8"):
            raise WireError(f"images.dtype must be float32 or uint8, got {dtype!r}")
        if not (isinstance(shape, list) and len(shape) in (3, 4)
                and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
            raise WireError(f"images.shape must be [N, C, H, W] or [N, H, W] of positive ints, got {shape!r}")
        if len(shape) == 4 and shape[1] not in (1, 3):
            raise WireError(f"images.shape: {shape[1]} channels; images have 1 or 3")
        limits.check_count(shape[0])
        limits.check_pixels(shape[-2], shape[-1])
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
        files = payload.get("data")
        if not isinstance(files, list) or not files:
            raise WireError("images.data must be a non-empty list of base64 PNG files")
        limits.check_count(len(files))
        out = []
        for i, f in enumerate(files):
            img = decode_png(f, limits, f"images.data[{i}]")
            arr = torch.from_numpy(np.asarray(img.convert("L" if payload.get("channels") == 1 else "RGB")).copy())
            out.append(arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1))
        if len({tuple(o.shape) for o in out}) != 1:
            raise WireError("images.data: every PNG in one request must have the same size")
        return torch.stack(out).float() / 255.0
    raise WireError(f"images.format must be raw or png, got {fmt!r}")


def png_data_url(image: torch.Tensor) -> str:
    """One ``[C, H, W]`` image in [0, 1] as a ``data:image/png;base64,...`` URL (OpenAI chat content)."""
    return "data:image/png;base64," + encode_images(image[None], "png")["data"][0]
