"""Triton kernel of the rotation in :mod:`switchhead.rope`: ``y = x * C[t] + x[perm] * S[t]``.

``x`` is a 3-D view ``[M, G, D]`` (any strides) whose row ``m`` is at table row ``m % T``;
``C``/``S`` are ``[T, D]`` (contiguous), ``perm`` ``[D]``. One pass: each program reads a tile of
``BLOCK_R`` rows ``(m, g)``, gathers the permuted channels from the same rows (cache hits) and
writes the contiguous result. The backward is the same kernel with the inverse permutation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_kernel(
    x_ptr, c_ptr, s_ptr, p_ptr, y_ptr,
    n_rows, n_groups, n_pos, d,
    sx_m, sx_g, sx_d,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    m = rows // n_groups
    g = rows % n_groups
    t = m % n_pos
    col_ok = cols < d
    ok = (rows < n_rows)[:, None] & col_ok[None, :]
    perm = tl.load(p_ptr + cols, mask=col_ok, other=0)
    base = (m * sx_m + g * sx_g)[:, None]
    x = tl.load(x_ptr + base + cols[None, :] * sx_d, mask=ok, other=0.0).to(ACC)
    xp = tl.load(x_ptr + base + perm[None, :] * sx_d, mask=ok, other=0.0).to(ACC)
    table = t[:, None] * d + cols[None, :]
    c = tl.load(c_ptr + table, mask=ok, other=0.0).to(ACC)
    s = tl.load(s_ptr + table, mask=ok, other=0.0).to(ACC)
    y = x * c + xp * s
    tl.store(y_ptr + rows[:, None] * d + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, perm: torch.Tensor):
    """``x [M, G, D]`` -> contiguous ``[M, G, D]`` in ``x.dtype``."""
    m, g, d = x.shape
    y = torch.empty(m, g, d, device=x.device, dtype=x.dtype)
    block_d = max(16, triton.next_power_of_2(d))
    block_r = max(1, 4096 // block_d)
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    grid = (triton.cdiv(m * g, block_r),)
    _rotate_kernel[grid](
        x, cos, sin, perm, y, m * g, g, cos.shape[0], d, *x.stride(),
        ACC=acc, BLOCK_R=block_r, BLOCK_D=block_d,
    )  # fmt: skip
    return y
