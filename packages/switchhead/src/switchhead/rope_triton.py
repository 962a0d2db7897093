"""Triton kernel of :class:`switchhead.rope.RotaryEmbedding`: the rotation in one pass each way.

``y = x * C + SIGN * x[..., partner] * S`` per row of ``head_size`` channels, where channel ``c``
of the first ``n_rotate`` pairs with ``c +- n_rotate / 2`` (the others with themselves, where
``C = 1`` and ``S = 0``) and ``C``, ``S`` are the module's tables at the row's position. The
forward takes ``SIGN = 1``; the backward (the inverse rotation) ``SIGN = -1``, because
``S[partner] = -S`` for the rotate-half pairing. Rows address ``x`` as ``[outer, T, inner]`` with
their own strides (the ``[B, T, 2, H, hs]`` view of a fused projection needs no copy); products in
float32, ``y`` contiguous in ``x``'s dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from cvmm_kernel.host_math import cdiv, next_power_of_2
from cvmm_kernel.launcher import launch

from .triton_support import row_alignment

# (rows per program, warps): the fastest on an H100 at T=4096, 57 against 68 us for (16, 4)
# (benchmarks/results/sweep_row_kernels_T4096.md)
CONFIG = (8, 2)


@triton.jit
def _rope_kernel(
    X, COS, SIN, Y,
    R, N, INNER, offset,
    sx0, sx1, sx2,
    HS: tl.constexpr, N_ROT: tl.constexpr, SIGN: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    half: tl.constexpr = N_ROT // 2
    partner = tl.where(cols < half, cols + half, tl.where(cols < N_ROT, cols - half, cols))
    inner = rows % INNER
    t = (rows // INNER) % N
    x_rows = tl.multiple_of((rows // (INNER * N)) * sx0 + t * sx1 + inner * sx2, ALIGN)
    ok = (rows < R)[:, None] & (cols < HS)[None, :]
    x = tl.load(X + x_rows[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    xp = tl.load(X + x_rows[:, None] + partner[None, :], mask=ok, other=0.0).to(tl.float32)
    table = (offset + t) * HS
    c = tl.load(COS + table[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    s = tl.load(SIN + table[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    y = x * c + SIGN * (xp * s)
    tl.store(Y + rows[:, None] * HS + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)


def rotate(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    offset: int,
    n_rotate: int,
    inverse: bool,
    config: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``x [outer, T, inner, hs]`` (channels contiguous), tables ``[L, hs]`` (contiguous, ``L >=
    offset + T``) -> ``y`` of ``x``'s shape, contiguous."""
    outer, n, inner, hs = x.shape
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    rows = outer * n * inner
    if rows == 0:
        return y
    block_r, warps = config or CONFIG
    launch(
        _rope_kernel, (cdiv(rows, block_r),),
        x, cos, sin, y,
        rows, n, inner, offset,
        *x.stride()[:3],
        hs, n_rotate, -1.0 if inverse else 1.0, row_alignment(hs, x),
        block_r, max(16, next_power_of_2(hs)), num_warps=warps,
    )  # fmt: skip
    return y
