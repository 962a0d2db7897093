"""The Triton kernel of :func:`cvmm_kernel.topk.topk_indices`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .host_math import cdiv, next_power_of_2
from .traced_ops import is_traced, launch_traced


@triton.jit
def _topk_indices_kernel(
    scores_ptr,
    out_ptr,
    R,
    E,
    stride_r,
    K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """``BLOCK_R`` rows per program, each whole in registers: ``K`` times, the largest score not
    yet taken (the lowest index among equals) is written out and marked taken."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < R
    valid = row_ok[:, None] & (cols[None, :] < E)
    x = tl.load(
        scores_ptr + rows[:, None].to(tl.int64) * stride_r + cols[None, :],
        mask=valid,
        other=float("-inf"),
    ).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # NaN ranks first, as in torch.topk
    taken = ~valid  # padding is never a candidate
    for j in range(K):
        best = tl.max(tl.where(taken, float("-inf"), x), axis=1)
        # among the untaken entries equal to the best (possibly -inf), the lowest index
        hit = (x == best[:, None]) & ~taken
        index = tl.min(tl.where(hit, cols[None, :], BLOCK_E), axis=1)
        tl.store(out_ptr + rows.to(tl.int64) * K + j, index.to(tl.int64), mask=row_ok)
        taken = taken | (cols[None, :] == index[:, None])


def row_blocks(width: int) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_E)`` of a kernel that holds blocks of whole rows of ``width`` in
    registers (about 4096 elements per program): the top-k here and ``router_triton``'s."""
    block_e = next_power_of_2(width)
    return max(1, min(64, 4096 // block_e)), block_e


def launch_topk(rows: torch.Tensor, out: torch.Tensor) -> None:
    """``rows [R, E]`` (last dimension contiguous or not) -> ``out [R, k]`` int64, filled."""
    n_rows, width = rows.shape
    k = out.shape[1]
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    block_r, block_e = row_blocks(width)
    grid = (cdiv(n_rows, block_r),)
    args = (rows, out, n_rows, width, rows.stride(0))
    settings = {"K": k, "BLOCK_R": block_r, "BLOCK_E": block_e, "num_warps": 4}
    if is_traced(rows):  # the custom op's body traced for torch.compile
        launch_traced(_topk_indices_kernel, grid, *args, **settings)
    else:
        _topk_indices_kernel[grid](*args, **settings)
