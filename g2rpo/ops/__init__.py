"""Fused SDE-step and log-prob-ratio ops with interchangeable backends.

``backend`` is ``"auto"`` (Triton on CUDA tensors, the C++ op on CPU when built, else torch),
``"torch"`` (the reference of :mod:`g2rpo.sde`), ``"triton"`` (``g2rpo.ops.triton_sde``; on
CPU only under ``TRITON_INTERPRET=1``), ``"cpp"`` or ``"cuda"`` (the extension in ``csrc/``).

Every backend computes the same two memory passes over ``[B, N]`` rows (``N`` = all
non-batch elements), with ``x`` and ``v`` either per row or one row shared by the group:

* ``sde_step``: ``x_next = a x + b v + std * noise`` and ``S_r = sum_n (x_next - mean)^2``;
* ``residual_sums``: ``S_r`` for a given ``x_next``, differentiable in ``v`` through the
  analytic backward ``dS_r / dv = -2 b_r (x_next_r - mean_r)`` (summed over rows when ``v``
  is shared). It is a ``torch.library`` custom op with ``register_autograd`` (the
  autograd.Function of the library), so ``torch.compile`` traces around it.

The O(B) rest is torch: ``log p = -S / (2 std^2 N) - log std - log sqrt(2 pi)`` (Eq. 3's
Gaussian, averaged over dims) and the clipped surrogate of :mod:`g2rpo.loss`, whose
gradient reaches ``v`` as ``d log p / d mean = (x_next - mean) / (std^2 N)``.
"""

from __future__ import annotations

import torch

from ..loss import SurrogateOutput, clipped_surrogate
from ..sde import log_density_from_sums
from .dispatch import BACKENDS, _cpp_ops, _resolve, _residual_sums, _triton, available_backends

__all__ = ["BACKENDS", "available_backends", "sde_step_logprob", "logprob", "logprob_ratio_loss"]


def _rows(x: torch.Tensor, B: int, name: str) -> torch.Tensor:
    """``x`` as a contiguous ``[1 or B, N]`` matrix."""
    if x.shape[0] not in (1, B):
        raise ValueError(f"{name} has batch {x.shape[0]}; expected 1 (shared) or {B}")
    return x.reshape(x.shape[0], -1).contiguous()


def _coef(c: torch.Tensor | float, B: int, like: torch.Tensor) -> torch.Tensor:
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    t = torch.as_tensor(c, device=like.device, dtype=dtype).reshape(-1)
    if t.numel() not in (1, B):
        raise ValueError(f"a per-row coefficient has {t.numel()} entries for {B} rows")
    return t.expand(B).contiguous()


# ---- public API ----------------------------------------------------------------------------

def sde_step_logprob(x: torch.Tensor, v: torch.Tensor, noise: torch.Tensor, a, b, std,
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One fused SDE step: ``(x_next [B, ...] fp32, log_prob [B])`` (no autograd; sampling only).

    ``x`` and ``v`` are ``[B, ...]`` or ``[1, ...]`` (shared by the group); ``a, b, std`` scalars
    or per-row ``[B]`` (see :func:`g2rpo.sde.sde_coefficients`).
    """
    B, shape = noise.shape[0], noise.shape
    n = noise[0].numel()
    be = _resolve(backend, noise.device)
    xr, vr, zr = _rows(x, B, "x"), _rows(v, B, "v"), noise.reshape(B, -1).contiguous()
    ac, bc, sc = _coef(a, B, zr), _coef(b, B, zr), _coef(std, B, zr)
    with torch.no_grad():
        if be == "torch":
            from ..sde import sde_transition

            xn, lp, _ = sde_transition(x, v, ac, bc, sc, noise=noise)
            return xn.reshape(shape), lp
        if be == "triton":
            xn, part = _triton().sde_step(xr, vr, zr, ac, bc, sc)
            sums = part.sum(dim=1)
        else:
            ops = _cpp_ops()
            if ops is None:
                raise RuntimeError("the g2rpo C++ extension is not built (pip install --no-build-isolation -e .)")
            xn, sums = ops.sde_step(xr, vr, zr, ac, bc, sc)
    return xn.reshape(shape), log_density_from_sums(sums, sc, n)


def logprob(x: torch.Tensor, x_next: torch.Tensor, v: torch.Tensor, a, b, std, backend: str = "auto") -> torch.Tensor:
    """Gaussian log-prob ``[B]`` of ``x_next`` under ``N(a x + b v, std^2)`` (mean over dims),
    differentiable in ``v`` (shared ``v`` gets the group's summed gradient)."""
    B = x_next.shape[0]
    n = x_next[0].numel()
    be = _resolve(backend, x_next.device)
    xn = x_next.detach().reshape(B, -1).contiguous()
    ac, bc, sc = _coef(a, B, xn), _coef(b, B, xn), _coef(std, B, xn)
    vr = v.reshape(v.shape[0], -1)
    if vr.shape[0] not in (1, B):
        raise ValueError(f"v has batch {vr.shape[0]}; expected 1 (shared) or {B}")
    sums = _residual_sums(_rows(x.detach(), B, "x"), vr.contiguous(), xn, ac, bc, be)
    return log_density_from_sums(sums, sc, n)


def logprob_ratio_loss(x: torch.Tensor, x_next: torch.Tensor, v: torch.Tensor, old_log_prob: torch.Tensor,
                       advantages: torch.Tensor, a, b, std, clip_range: float, adv_clip: float,
                       backend: str = "auto") -> SurrogateOutput:
    """Per-row clipped-surrogate loss (Eq. 12) with ratio and clip flag; backward reaches ``v`` only."""
    lp = logprob(x, x_next, v, a, b, std, backend)
    return clipped_surrogate(lp, old_log_prob.to(lp.dtype), advantages.to(lp.dtype), clip_range, adv_clip)
