"""Triton kernels of :mod:`moeut.norm_cast`: a layer norm that also writes its input, both in
the autocast dtype, optionally after adding a residual branch, in one pass each way.

Forward, per row of ``D`` channels: ``x = x + delta`` (in float32, stored, with a ``delta``),
``xc = x``, ``n = (x - mean) * rstd * w + b`` (statistics and products in float32), ``xc`` and
``n`` stored in the output dtype, ``mean`` and ``rstd`` kept for the backward. Backward, per
program a range of rows: ``dx = rstd * (w dn - xhat <w dn, xhat> / D - <w dn, 1> / D) + dxc +
ds`` in float32 (also stored in ``delta``'s dtype as its gradient), and the program's partial sums
of ``dn * xhat`` and ``dn`` over its rows (the weight and bias gradients), which one ``sum`` adds
up.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from cvmm_kernel.host_math import cdiv, next_power_of_2
from cvmm_kernel.launcher import launch, multiprocessors

# Elements of a [rows, D] block per program (or per step of the backward): 4 rows of MoEUT's
# d_model 1024, fewer of wider rows (1 from 4096 channels on), with 8 warps from 2048 channels.
BLOCK_ELEMENTS = 4096


def _block(d: int) -> tuple[int, int, int]:
    """``(rows, BLOCK_D, warps)`` of a block of rows of ``d`` channels."""
    block_d = next_power_of_2(d)
    return max(1, BLOCK_ELEMENTS // block_d), block_d, 4 if block_d <= 1024 else 8


@triton.jit
def _norm_cast_forward_kernel(
    X, DELTA, S, W, B, XC, N, MEAN, RSTD,
    R, D, stride_x, stride_delta, eps,
    HAS_DELTA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    ok = row_ok[:, None] & (cols < D)[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    out = rows[:, None] * D + cols[None, :]
    if HAS_DELTA:  # the residual sum first, kept in float32
        delta = tl.load(DELTA + rows[:, None] * stride_delta + cols[None, :], mask=ok, other=0.0)
        x += delta.to(tl.float32)
        tl.store(S + out, x, mask=ok)
    mean = tl.sum(x, axis=1) / D
    xm = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xm * xm, axis=1) / D + eps)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cols < D, other=0.0).to(tl.float32)
    n = xm * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(XC + out, x.to(XC.dtype.element_ty), mask=ok)
    tl.store(N + out, n.to(N.dtype.element_ty), mask=ok)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _norm_cast_backward_kernel(
    X, W, MEAN, RSTD, DN, DXC, DS, DX, DDELTA, PARTS,
    R, D, stride_x, rows_per_program,
    HAS_DXC: tl.constexpr, HAS_DS: tl.constexpr, HAS_DDELTA: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db = tl.zeros((BLOCK_D,), dtype=tl.float32)
    start = program.to(tl.int64) * rows_per_program
    for r0 in range(0, rows_per_program, BLOCK_R):
        rows = start + r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        at = rows[:, None] * D + cols[None, :]
        dn = tl.load(DN + at, mask=ok, other=0.0).to(tl.float32)
        xhat = tl.where(ok, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        wdn = w[None, :] * dn
        c1 = tl.sum(xhat * wdn, axis=1) / D
        c2 = tl.sum(wdn, axis=1) / D
        dx = (wdn - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DXC:
            dx += tl.load(DXC + at, mask=ok, other=0.0).to(tl.float32)
        if HAS_DS:
            dx += tl.load(DS + at, mask=ok, other=0.0).to(tl.float32)
        tl.store(DX + at, dx.to(DX.dtype.element_ty), mask=ok)
        if HAS_DDELTA:
            tl.store(DDELTA + at, dx.to(DDELTA.dtype.element_ty), mask=ok)
        dw += tl.sum(dn * xhat, axis=0)
        db += tl.sum(dn, axis=0)
    part = PARTS + program.to(tl.int64) * 2 * D
    tl.store(part + cols, dw, mask=col_ok)
    tl.store(part + D + cols, db, mask=col_ok)


def forward(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [R, D]`` (and ``delta [R, D]``; rows of contiguous channels) -> ``(s, xc, n, mean,
    rstd)``: ``s = x + delta`` ``[R, D]`` float32 contiguous (None without ``delta``), ``xc``
    (``s`` or ``x``) and its norm ``n`` ``[R, D]`` contiguous in ``dtype``, ``mean`` and
    ``rstd`` ``[R]`` float32."""
    r, d = x.shape
    s = None if delta is None else torch.empty(r, d, device=x.device, dtype=torch.float32)
    xc = torch.empty(r, d, device=x.device, dtype=dtype)
    n = torch.empty_like(xc)
    mean = torch.empty(r, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    block_r, block_d, warps = _block(d)
    launch(
        _norm_cast_forward_kernel, (cdiv(r, block_r),),
        x, x if delta is None else delta, xc if s is None else s, weight, bias, xc, n, mean,
        rstd, r, d, x.stride(0), 0 if delta is None else delta.stride(0), eps,
        delta is not None, block_r, block_d, num_warps=warps,
    )  # fmt: skip
    return s, xc, n, mean, rstd


def backward(
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dn: torch.Tensor,
    dxc: torch.Tensor | None,
    ds: torch.Tensor | None = None,
    delta_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(dx [R, D]`` in ``x``'s dtype, ``ddelta`` (the same values in ``delta_dtype``, None
    without it), ``dweight, dbias [D]`` float32)``; ``x`` the normalised rows (the sum, with a
    ``delta``), the gradients ``dn``, ``dxc`` (of the cast copy) and ``ds`` (of the float32
    sum) ``[R, D]`` contiguous or None where none reached that output (``dn`` always given)."""
    r, d = x.shape
    dx = torch.empty(r, d, device=x.device, dtype=x.dtype)
    ddelta = None if delta_dtype is None else torch.empty(r, d, device=x.device, dtype=delta_dtype)
    block_r, block_d, warps = _block(d)
    programs = _programs(x.device)
    rows_per_program = cdiv(cdiv(r, programs), block_r) * block_r
    programs = cdiv(r, rows_per_program)
    parts = torch.empty(programs, 2, d, device=x.device, dtype=torch.float32)
    launch(
        _norm_cast_backward_kernel, (programs,),
        x, weight, mean, rstd, dn, dn if dxc is None else dxc, dn if ds is None else ds, dx,
        dx if ddelta is None else ddelta, parts, r, d, x.stride(0), rows_per_program,
        dxc is not None, ds is not None, ddelta is not None, block_r, block_d, num_warps=warps,
    )  # fmt: skip
    dw, db = parts.sum(0).unbind(0)
    return dx, ddelta, dw, db


def _programs(device: torch.device) -> int:
    """Backward programs: two per SM (a few on the interpreter)."""
    return 2 * multiprocessors(device) if device.type == "cuda" else 3
