"""Triton kernels of the expert gates (see :mod:`switchhead.gating` for the maths).

Tensors are 4-D/3-D views with arbitrary strides (no copies): ``x [M, H, E, D]``,
``r [M, H, D]``, ``gate [M, H, E]``. A program handles ``BLOCK_R`` (m, h) rows and all ``D``
channels; the ``E`` experts are a compile-time loop. Accumulation is in float32 (float64 for
float64 inputs).

- ``_gated_sum_kernel``: ``y = sum_e gate_e * x_e``; with ``DOT``, also ``dg_e = <x_e, r>``.
- ``_gated_expand_kernel``: ``a_e = gate_e * r``; with ``DOT``, also ``dg_e = <x_e, r>``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gated_sum_kernel(
    x_ptr, g_ptr, r_ptr, y_ptr, dg_ptr,
    n_rows, n_heads, d,
    sx_m, sx_h, sx_e, sx_d,
    sg_m, sg_h, sg_e,
    sr_m, sr_h, sr_d,
    sy_m, sy_h, sy_d,
    sdg_m, sdg_h, sdg_e,
    E: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    m = rows // n_heads
    h = rows % n_heads
    ok = row_ok[:, None] & (cols[None, :] < d)
    if DOT:
        r = tl.load(
            r_ptr + (m * sr_m + h * sr_h)[:, None] + cols[None, :] * sr_d, mask=ok, other=0.0
        ).to(ACC)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC)
    for e in tl.static_range(E):
        g = tl.load(g_ptr + m * sg_m + h * sg_h + e * sg_e, mask=row_ok, other=0.0)
        x = tl.load(
            x_ptr + (m * sx_m + h * sx_h + e * sx_e)[:, None] + cols[None, :] * sx_d,
            mask=ok,
            other=0.0,
        ).to(ACC)
        acc += g.to(ACC)[:, None] * x
        if DOT:
            dg = tl.sum(x * r, axis=1)
            tl.store(
                dg_ptr + m * sdg_m + h * sdg_h + e * sdg_e,
                dg.to(dg_ptr.dtype.element_ty),
                mask=row_ok,
            )
    tl.store(
        y_ptr + (m * sy_m + h * sy_h)[:, None] + cols[None, :] * sy_d,
        acc.to(y_ptr.dtype.element_ty),
        mask=ok,
    )


@triton.jit
def _gated_expand_kernel(
    r_ptr, g_ptr, x_ptr, a_ptr, dg_ptr,
    n_rows, n_heads, d,
    sr_m, sr_h, sr_d,
    sg_m, sg_h, sg_e,
    sx_m, sx_h, sx_e, sx_d,
    sa_m, sa_h, sa_e, sa_d,
    sdg_m, sdg_h, sdg_e,
    E: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    m = rows // n_heads
    h = rows % n_heads
    ok = row_ok[:, None] & (cols[None, :] < d)
    r = tl.load(
        r_ptr + (m * sr_m + h * sr_h)[:, None] + cols[None, :] * sr_d, mask=ok, other=0.0
    ).to(ACC)
    for e in tl.static_range(E):
        g = tl.load(g_ptr + m * sg_m + h * sg_h + e * sg_e, mask=row_ok, other=0.0)
        a = g.to(ACC)[:, None] * r
        tl.store(
            a_ptr + (m * sa_m + h * sa_h + e * sa_e)[:, None] + cols[None, :] * sa_d,
            a.to(a_ptr.dtype.element_ty),
            mask=ok,
        )
        if DOT:
            x = tl.load(
                x_ptr + (m * sx_m + h * sx_h + e * sx_e)[:, None] + cols[None, :] * sx_d,
                mask=ok,
                other=0.0,
            ).to(ACC)
            dg = tl.sum(x * r, axis=1)
            tl.store(
                dg_ptr + m * sdg_m + h * sdg_h + e * sdg_e,
                dg.to(dg_ptr.dtype.element_ty),
                mask=row_ok,
            )


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(d: int) -> tuple[int, int]:
    block_d = max(16, triton.next_power_of_2(d))
    return max(1, 4096 // block_d), block_d


def gated_sum(x, gate, r, out_dtype, dg_dtype):
    """``y [M, H, D] = sum_e gate * x``; and ``dg [M, H, E] = <x_e, r>`` when ``r`` is given."""
    m, h, e, d = x.shape
    y = torch.empty(m, h, d, device=x.device, dtype=out_dtype)
    dot = r is not None
    dg = torch.empty(m, h, e, device=x.device, dtype=dg_dtype) if dot else y
    r_ = r if dot else y
    block_r, block_d = _blocks(d)
    grid = (triton.cdiv(m * h, block_r),)
    _gated_sum_kernel[grid](
        x, gate, r_, y, dg, m * h, h, d,
        *x.stride(), *gate.stride(), *r_.stride(), *y.stride(),
        *(dg.stride() if dot else (0, 0, 0)),
        E=e, DOT=dot, ACC=_acc(x.dtype), BLOCK_R=block_r, BLOCK_D=block_d,
    )  # fmt: skip
    return y, (dg if dot else None)


def gated_expand(r, gate, x, out_dtype, dg_dtype):
    """``a [M, H, E, D] = gate * r``; and ``dg [M, H, E] = <x_e, r>`` when ``x`` is given."""
    m, h, d = r.shape
    e = gate.shape[-1]
    a = torch.empty(m, h, e, d, device=r.device, dtype=out_dtype)
    dot = x is not None
    dg = torch.empty(m, h, e, device=r.device, dtype=dg_dtype) if dot else a
    x_ = x if dot else a
    block_r, block_d = _blocks(d)
    grid = (triton.cdiv(m * h, block_r),)
    _gated_expand_kernel[grid](
        r, gate, x_, a, dg, m * h, h, d,
        *r.stride(), *gate.stride(), *x_.stride(), *a.stride(),
        *(dg.stride() if dot else (0, 0, 0)),
        E=e, DOT=dot, ACC=_acc(r.dtype), BLOCK_R=block_r, BLOCK_D=block_d,
    )  # fmt: skip
    return a, (dg if dot else None)
