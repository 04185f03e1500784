"""Triton kernels of the fused SDE step and the residual sums behind the log-prob ratio.

The math is :mod:`g2rpo.sde`'s reference (``mean = a x + b v``, per-row ``a, b, std``):

* ``sde_step``: ``x_next = mean + std * noise`` and per-row partial sums of
  ``(x_next - mean)^2`` (the Gaussian log-prob's only O(N) part) in one pass.
* ``residual_sums``: per-row partial sums of ``(x_next - mean)^2`` for given ``x_next``.
* ``residual_sums_backward``: ``grad_v = sum_r g_r * (-2 b_r) * (x_next_r - mean_r)``, summed over
  the rows when ``v`` is shared (one row for the whole group), per row otherwise.

Each program owns one block of columns and loops over the rows, so a shared ``x``/``v``
block is read once per block, not once per row; rows longer than one block are split
over several programs (``cdiv(N, BLOCK)`` of them), and the partial sums ``[B, n_blocks]``
are reduced by the caller. ``x`` and ``v`` have a row stride of 0 when shared.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _shared_block(x_ptr, v_ptr, N, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """This program's column block: its index, offsets, mask and the shared x / v rows on it (row 0: read once)."""
    blk = tl.program_id(0)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x_shared = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    v_shared = tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC)
    return blk, offs, mask, x_shared, v_shared


@triton.jit
def _row_mean(x_ptr, v_ptr, a_ptr, b_ptr, x_shared, v_shared, r, offs, mask, x_stride, v_stride, ACC: tl.constexpr):
    """``a_r * x_r + b_r * v_r`` on one column block; a shared x/v block is passed in, not re-read."""
    x = x_shared
    v = v_shared
    if x_stride != 0:
        x = tl.load(x_ptr + r * x_stride + offs, mask=mask, other=0.0).to(ACC)
    if v_stride != 0:
        v = tl.load(v_ptr + r * v_stride + offs, mask=mask, other=0.0).to(ACC)
    return tl.load(a_ptr + r).to(ACC) * x + tl.load(b_ptr + r).to(ACC) * v


@triton.jit
def _sde_step_kernel(x_ptr, v_ptr, z_ptr, out_ptr, a_ptr, b_ptr, s_ptr, part_ptr, B, N, x_stride, v_stride,
                     n_blocks, BLOCK: tl.constexpr, ACC: tl.constexpr):
    blk, offs, mask, x_shared, v_shared = _shared_block(x_ptr, v_ptr, N, BLOCK, ACC)
    for r in range(0, B):
        mean = _row_mean(x_ptr, v_ptr, a_ptr, b_ptr, x_shared, v_shared, r, offs, mask, x_stride, v_stride, ACC)
        z = tl.load(z_ptr + r * N + offs, mask=mask, other=0.0).to(ACC)
        xn = mean + tl.load(s_ptr + r).to(ACC) * z
        tl.store(out_ptr + r * N + offs, xn.to(out_ptr.dtype.element_ty), mask=mask)
        d = tl.where(mask, xn - mean, 0.0)
        tl.store(part_ptr + r * n_blocks + blk, tl.sum(d * d, axis=0))


@triton.jit
def _residual_sums_kernel(x_ptr, v_ptr, xn_ptr, a_ptr, b_ptr, part_ptr, B, N, x_stride, v_stride, n_blocks,
                          BLOCK: tl.constexpr, ACC: tl.constexpr):
    blk, offs, mask, x_shared, v_shared = _shared_block(x_ptr, v_ptr, N, BLOCK, ACC)
    for r in range(0, B):
        mean = _row_mean(x_ptr, v_ptr, a_ptr, b_ptr, x_shared, v_shared, r, offs, mask, x_stride, v_stride, ACC)
        xn = tl.load(xn_ptr + r * N + offs, mask=mask, other=0.0).to(ACC)
        d = tl.where(mask, xn - mean, 0.0)
        tl.store(part_ptr + r * n_blocks + blk, tl.sum(d * d, axis=0))


@triton.jit
def _residual_sums_bwd_kernel(x_ptr, v_ptr, xn_ptr, a_ptr, b_ptr, g_ptr, gv_ptr, B, N, x_stride, v_stride,
                              BLOCK: tl.constexpr, ACC: tl.constexpr):
    blk, offs, mask, x_shared, v_shared = _shared_block(x_ptr, v_ptr, N, BLOCK, ACC)
    acc = tl.zeros((BLOCK,), dtype=ACC)
    for r in range(0, B):
        mean = _row_mean(x_ptr, v_ptr, a_ptr, b_ptr, x_shared, v_shared, r, offs, mask, x_stride, v_stride, ACC)
        xn = tl.load(xn_ptr + r * N + offs, mask=mask, other=0.0).to(ACC)
        contrib = -2.0 * tl.load(g_ptr + r).to(ACC) * tl.load(b_ptr + r).to(ACC) * (xn - mean)
        if v_stride != 0:
            tl.store(gv_ptr + r * N + offs, contrib.to(gv_ptr.dtype.element_ty), mask=mask)
        else:
            acc += contrib
    if v_stride == 0:
        tl.store(gv_ptr + offs, acc.to(gv_ptr.dtype.element_ty), mask=mask)


def _acc(dtype):
    import torch

    return tl.float64 if dtype == torch.float64 else tl.float32


def _launch_args(x, v, n, block):
    x_stride = 0 if x.shape[0] == 1 else n
    v_stride = 0 if v.shape[0] == 1 else n
    return x_stride, v_stride, triton.cdiv(n, block)


def sde_step(x, v, z, a, b, s, block: int = 4096):
    """``(x_next fp32/fp64 [B, N], partial sums [B, n_blocks])``; ``x``/``v`` are ``[B or 1, N]`` contiguous."""
    import torch

    B, N = z.shape
    x_stride, v_stride, n_blocks = _launch_args(x, v, N, block)
    out_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    out = torch.empty((B, N), device=z.device, dtype=out_dtype)
    part = torch.empty((B, n_blocks), device=z.device, dtype=out_dtype)
    _sde_step_kernel[(n_blocks,)](x, v, z, out, a, b, s, part, B, N, x_stride, v_stride, n_blocks, BLOCK=block,
                                  ACC=_acc(out_dtype))
    return out, part


def residual_sums(x, v, xn, a, b, block: int = 4096):
    import torch

    B, N = xn.shape
    x_stride, v_stride, n_blocks = _launch_args(x, v, N, block)
    acc_dtype = torch.float64 if xn.dtype == torch.float64 else torch.float32
    part = torch.empty((B, n_blocks), device=xn.device, dtype=acc_dtype)
    _residual_sums_kernel[(n_blocks,)](x, v, xn, a, b, part, B, N, x_stride, v_stride, n_blocks, BLOCK=block,
                                       ACC=_acc(acc_dtype))
    return part


def residual_sums_backward(x, v, xn, a, b, g, block: int = 4096):
    import torch

    B, N = xn.shape
    x_stride, v_stride, n_blocks = _launch_args(x, v, N, block)
    acc_dtype = torch.float64 if xn.dtype == torch.float64 else torch.float32
    gv = torch.empty((v.shape[0], N), device=xn.device, dtype=acc_dtype)
    _residual_sums_bwd_kernel[(n_blocks,)](x, v, xn, a, b, g, gv, B, N, x_stride, v_stride, BLOCK=block,
                                           ACC=_acc(acc_dtype))
    return gv
