"""Triton kernels of :mod:`switchhead.expert_mix` (the dense expert path's gated mixing).

A row is one (token, head); it has ``E`` expert slots of ``C`` channels and chooses ``K`` of them
(``index``, ``gate``: ``[R, K]``, contiguous). Two kernels, each one pass over its rows:

- ``gather``: ``out[r] = sum_j gate[r, j] * A[r, index[r, j]]`` (``[R, C]``), and optionally
  ``dgate[r, j] = B[r] . A[r, index[r, j]]``. It is the values' mix forward (``A`` = values)
  and the output spread's backward (``A`` = the spread's gradient, ``B`` = its input).
- ``spread``: ``out[r, e] = w[r, e] * X[r]`` (``[R, E, C]``) with ``w[r, e]`` the sum of the
  gates that chose ``e`` (0 for the others), and optionally ``dgate[r, j] = A[r, index[r, j]] .
  X[r]``. It is the output spread's forward (``X`` = the attention output) and the values' mix
  backward (``X`` = the mix's gradient, ``A`` = the values).

Rows address their tensors through up to three leading dimensions with their own strides
(``[B, T, H]`` views of a fused projection or of a transposed attention output need no copy);
within a row the layout is dense (the launchers copy where it is not), and the channel count is a
compile-time constant, so that rows whose starts are 16-byte aligned load and store in vectors.
Products and sums are float32; ``out`` takes the input's dtype, ``dgate`` is float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from cvmm_kernel.host_math import cdiv, next_power_of_2
from cvmm_kernel.launcher import launch

from .triton_support import row_alignment

# (rows per program, warps); ``config=`` of the launchers overrides it (benchmarks). On an H100
# at T=4096 (benchmarks/results/sweep_row_kernels_T4096.md) 16 rows and 4 warps were within 3 us
# of the best setting of every kernel.
CONFIG = (16, 4)


@triton.jit
def _row_offsets(rows, D1, D2, s0, s1, s2):
    """Row numbers -> offsets through three leading dims ``[D0, D1, D2]`` (int64)."""
    i2 = rows % D2
    i1 = (rows // D2) % D1
    i0 = rows // (D1 * D2)
    return i0 * s0 + i1 * s1 + i2 * s2


@triton.jit
def _gather_kernel(
    A, IDX, GATE, B, OUT, DGATE,
    R, D1, D2,
    sa0, sa1, sa2,
    sb0, sb1, sb2,
    C: tl.constexpr, K: tl.constexpr, HAS_B: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    row_ok = rows < R
    ok = row_ok[:, None] & (cols < C)[None, :]
    a_rows = tl.multiple_of(_row_offsets(rows, D1, D2, sa0, sa1, sa2), ALIGN)
    if HAS_B:
        b_rows = tl.multiple_of(_row_offsets(rows, D1, D2, sb0, sb1, sb2), ALIGN)
        b = tl.load(B + b_rows[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(K):
        e = tl.load(IDX + rows * K + j, mask=row_ok, other=0).to(tl.int64)
        g = tl.load(GATE + rows * K + j, mask=row_ok, other=0.0).to(tl.float32)
        a_off = tl.multiple_of(a_rows + e * C, ALIGN)[:, None] + cols[None, :]
        a = tl.load(A + a_off, mask=ok, other=0.0).to(tl.float32)
        acc += g[:, None] * a
        if HAS_B:
            tl.store(DGATE + rows * K + j, tl.sum(a * b, axis=1), mask=row_ok)
    out_off = rows[:, None] * C + cols[None, :]
    tl.store(OUT + out_off, acc.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _spread_kernel(
    X, IDX, GATE, A, OUT, DGATE,
    R, D1, D2, E,
    sx0, sx1, sx2,
    sa0, sa1, sa2,
    C: tl.constexpr, K: tl.constexpr, HAS_A: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    slots = tl.arange(0, BLOCK_K)
    row_ok = rows < R
    ok = row_ok[:, None] & (cols < C)[None, :]
    x_rows = tl.multiple_of(_row_offsets(rows, D1, D2, sx0, sx1, sx2), ALIGN)
    x = tl.load(X + x_rows[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    k_ok = row_ok[:, None] & (slots < K)[None, :]
    chosen = tl.load(IDX + rows[:, None] * K + slots[None, :], mask=k_ok, other=-1)
    gates = tl.load(GATE + rows[:, None] * K + slots[None, :], mask=k_ok, other=0.0)
    out_rows = rows * E * C
    for e in range(E):
        w = tl.sum(tl.where(chosen == e, gates.to(tl.float32), 0.0), axis=1)
        out_off = tl.multiple_of(out_rows + e * C, ALIGN)[:, None] + cols[None, :]
        tl.store(OUT + out_off, (w[:, None] * x).to(OUT.dtype.element_ty), mask=ok)
    if HAS_A:
        a_rows = tl.multiple_of(_row_offsets(rows, D1, D2, sa0, sa1, sa2), ALIGN)
        for j in tl.static_range(K):
            e = tl.load(IDX + rows * K + j, mask=row_ok, other=0).to(tl.int64)
            a_off = tl.multiple_of(a_rows + e * C, ALIGN)[:, None] + cols[None, :]
            a = tl.load(A + a_off, mask=ok, other=0.0).to(tl.float32)
            tl.store(DGATE + rows * K + j, tl.sum(a * x, axis=1), mask=row_ok)


def _lead3(t: torch.Tensor, trailing: int) -> torch.Tensor:
    """``t`` with exactly three leading dims before its ``trailing`` ones, whose own layout is
    dense (channels contiguous, slots ``C`` apart): size-1 dims prepended, or the first ones
    merged (a copy only where they do not merge or the trailing layout is not dense)."""
    lead = t.dim() - trailing
    dense_stride = 1
    for size, stride in zip(reversed(t.shape[lead:]), reversed(t.stride()[lead:])):
        if size > 1 and stride != dense_stride:
            t = t.contiguous()
            break
        dense_stride *= size
    if lead <= 3:
        return t.reshape((1,) * (3 - lead) + tuple(t.shape))
    merged = t.shape[: lead - 2].numel()
    try:
        return t.view(merged, *t.shape[lead - 2 :])
    except RuntimeError:
        return t.reshape(merged, *t.shape[lead - 2 :])


def _block_c(c: int) -> int:
    return max(16, next_power_of_2(c))


def gather(
    a: torch.Tensor,
    index: torch.Tensor,
    gate: torch.Tensor,
    b: torch.Tensor | None,
    config: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``a [..., E, C]``, ``index``/``gate [..., K]``, ``b [..., C]`` or None ->
    ``(out [..., C] in a's dtype, dgate [..., K] float32 or None)``."""
    k, c = index.shape[-1], a.shape[-1]
    a3 = _lead3(a, 2)
    rows = a3.shape[:3].numel()
    idx = index.reshape(rows, k).contiguous()
    g = gate.reshape(rows, k).contiguous()
    out = torch.empty((*a.shape[:-2], c), device=a.device, dtype=a.dtype)
    dgate = torch.empty(idx.shape, device=a.device, dtype=torch.float32) if b is not None else None
    b3 = _lead3(b, 1) if b is not None else out.view(*a3.shape[:3], c)
    block_r, warps = config or CONFIG
    grid = (cdiv(rows, block_r),)
    launch(
        _gather_kernel, grid,
        a3, idx, g, b3, out, dgate if dgate is not None else g,
        rows, a3.shape[1], a3.shape[2],
        *a3.stride()[:3],
        *b3.stride()[:3],
        c, k, b is not None, row_alignment(c, a3, b3),
        block_r, _block_c(c), num_warps=warps,
    )  # fmt: skip
    return out, None if dgate is None else dgate.view(index.shape)


def spread(
    x: torch.Tensor,
    index: torch.Tensor,
    gate: torch.Tensor,
    n_experts: int,
    a: torch.Tensor | None,
    config: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x [..., C]``, ``index``/``gate [..., K]``, ``a [..., E, C]`` or None ->
    ``(out [..., E, C] in x's dtype, dgate [..., K] float32 or None)``."""
    k, c = index.shape[-1], x.shape[-1]
    x3 = _lead3(x, 1)
    rows = x3.shape[:3].numel()
    idx = index.reshape(rows, k).contiguous()
    g = gate.reshape(rows, k).contiguous()
    out = torch.empty((*x.shape[:-1], n_experts, c), device=x.device, dtype=x.dtype)
    dgate = torch.empty(idx.shape, device=x.device, dtype=torch.float32) if a is not None else None
    a3 = _lead3(a, 2) if a is not None else out.view(*x3.shape[:3], n_experts, c)
    block_r, warps = config or CONFIG
    grid = (cdiv(rows, block_r),)
    launch(
        _spread_kernel, grid,
        x3, idx, g, a3, out, dgate if dgate is not None else g,
        rows, x3.shape[1], x3.shape[2], n_experts,
        *x3.stride()[:3],
        *a3.stride()[:3],
        c, k, a is not None, row_alignment(c, x3, a3),
        block_r, _block_c(c), max(2, next_power_of_2(k)), num_warps=warps,
    )  # fmt: skip
    return out, None if dgate is None else dgate.view(index.shape)
