"""Which backend runs an op: the compiled extension, the Triton kernels, ``auto``'s choice, and the
``torch.library`` custom op ``g2rpo::residual_sums`` (with its analytic backward) that dispatches to them."""

from __future__ import annotations

import torch

__all__ = ["BACKENDS", "available_backends"]

BACKENDS = ("auto", "torch", "triton", "cpp", "cuda")


def _extension():
    """The compiled extension (importing it registers ``torch.ops.g2rpo_C``), or None when not built."""
    try:
        from . import _build
    except ImportError:
        return None
    return _build


def _cpp_ops():
    return torch.ops.g2rpo_C if _extension() is not None else None


def _triton():
    try:
        from . import triton_sde as sde_ops
    except Exception:  # triton missing or unusable on this machine
        return None
    return sde_ops


def available_backends() -> list[str]:
    out = ["torch"]
    if _triton() is not None:
        out.append("triton")
    ext = _extension()
    if ext is not None:
        out.append("cpp")
        if torch.cuda.is_available() and ext.cuda:
            out.append("cuda")
    return out


def _resolve(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "triton" if _triton() is not None else "torch"
    return "cpp" if _extension() is not None else "torch"


def _residual_sums_impl(x, v, xn, a, b, backend: str) -> torch.Tensor:
    if backend == "torch":
        acc = torch.float64 if xn.dtype == torch.float64 else torch.float32
        mean = a.to(acc)[:, None] * x.to(acc) + b.to(acc)[:, None] * v.to(acc)
        return ((xn.to(acc) - mean) ** 2).sum(dim=1)
    if backend == "triton":
        return _triton().residual_sums(x, v, xn, a, b).sum(dim=1)
    if backend in ("cpp", "cuda"):
        ops = _cpp_ops()
        if ops is None:
            raise RuntimeError("the g2rpo C++ extension is not built (pip install --no-build-isolation -e .)")
        return ops.residual_sums(x, v, xn, a, b)
    raise ValueError(backend)


def _residual_sums_bwd_impl(x, v, xn, a, b, g, backend: str) -> torch.Tensor:
    if backend == "torch":
        acc = torch.float64 if xn.dtype == torch.float64 else torch.float32
        d = xn.to(acc) - (a.to(acc)[:, None] * x.to(acc) + b.to(acc)[:, None] * v.to(acc))
        gv = -2.0 * (g.to(acc) * b.to(acc))[:, None] * d
        return gv.sum(dim=0, keepdim=True) if v.shape[0] == 1 else gv
    if backend == "triton":
        return _triton().residual_sums_backward(x, v, xn, a, b, g)
    if backend in ("cpp", "cuda"):
        return _cpp_ops().residual_sums_backward(x, v, xn, a, b, g)
    raise ValueError(backend)


@torch.library.custom_op("g2rpo::residual_sums", mutates_args=())
def _residual_sums(x: torch.Tensor, v: torch.Tensor, xn: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   backend: str) -> torch.Tensor:
    return _residual_sums_impl(x, v, xn, a, b, backend)


@_residual_sums.register_fake
def _(x, v, xn, a, b, backend):
    return xn.new_empty((xn.shape[0],), dtype=torch.float64 if xn.dtype == torch.float64 else torch.float32)


@torch.library.custom_op("g2rpo::residual_sums_backward", mutates_args=())
def _residual_sums_backward(x: torch.Tensor, v: torch.Tensor, xn: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                            g: torch.Tensor, backend: str) -> torch.Tensor:
    return _residual_sums_bwd_impl(x, v, xn, a, b, g, backend).to(v.dtype)


@_residual_sums_backward.register_fake
def _(x, v, xn, a, b, g, backend):
    return torch.empty_like(v)


def _setup(ctx, inputs, output):
    x, v, xn, a, b, backend = inputs
    ctx.save_for_backward(x, v, xn, a, b)
    ctx.backend = backend


def _backward(ctx, grad):
    x, v, xn, a, b = ctx.saved_tensors
    gv = _residual_sums_backward(x, v, xn, a, b, grad.contiguous(), ctx.backend) if ctx.needs_input_grad[1] else None
    return None, gv, None, None, None, None


torch.library.register_autograd("g2rpo::residual_sums", _backward, setup_context=_setup)
