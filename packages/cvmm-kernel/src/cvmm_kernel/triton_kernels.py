"""Triton kernels of CVMM: a gathered grouped matmul and the per-expert weight gradient.

Both kernels read ``expert_bounds`` (see :mod:`cvmm_kernel.layout`) over expert-sorted positions:

- ``gather_mm``: one program per (tile, column block). A tile holds up to ``BLOCK_M`` sorted
  positions of one expert; the program gathers their input rows, multiplies them by that
  expert's matrix and writes each product to its output row. No tile straddles two experts.
- ``expert_weight_grad``: one program per (expert, row block of ``d_in``, column block of
  ``d_out``) that loops over that expert's positions: ``dW[e] = X_e^T @ G_e``. Every output
  element is written by exactly one program, with no atomics, so it is deterministic.

Inputs are validated by the caller (``cvmm_kernel.ops``); these functions only launch. The tile
of a ``gather_mm`` program is found inside the kernel from ``expert_bounds`` (a vector over the
experts, so at most ``layout.MAX_EXPERTS_TRITON`` matrices), which keeps a call to one launch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .host_math import cdiv, next_power_of_2
from .interpreter import interpreting


@triton.jit
def _gather_mm_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    in_row_ptr,
    out_row_ptr,
    bounds_ptr,
    E,
    K,
    N,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wk,
    stride_wn,
    stride_om,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # Which expert's run this tile belongs to: tiles of BLOCK_M positions are numbered expert by
    # expert, so the tile's expert is the number of experts whose tiles all come before it.
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_e = tl.arange(0, BLOCK_E)
    lo = tl.load(bounds_ptr + offs_e, mask=offs_e < E, other=0)
    hi = tl.load(bounds_ptr + offs_e + 1, mask=offs_e < E, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(tiles, 0)
    expert = tl.sum((tiles_end <= tile).to(tl.int32), 0)
    if expert < E:
        is_expert = offs_e == expert
        first_tile = tl.sum(tl.where(is_expert, tiles_end - tiles, 0), 0)
        start = tl.sum(tl.where(is_expert, lo, 0), 0) + (tile - first_tile) * BLOCK_M
        end = tl.sum(tl.where(is_expert, hi, 0), 0)
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        rows_in = tl.load(in_row_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        rows_out = tl.load(out_row_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            a = tl.load(
                x_ptr + rows_in[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
            b = tl.load(
                w_base + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            ).to(a.dtype)  # fp32 weights with bf16/fp16 rows (autocast): cast the tile here
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        tl.store(
            out_ptr + rows_out[:, None] * stride_om + offs_n[None, :] * stride_on,
            acc.to(out_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_n[None, :],
        )


@triton.jit
def _expert_weight_grad_kernel(
    x_ptr,
    g_ptr,
    dw_ptr,
    in_row_ptr,
    out_row_ptr,
    bounds_ptr,
    K,
    N,
    stride_xm,
    stride_xk,
    stride_gm,
    stride_gn,
    stride_de,
    stride_dk,
    stride_dn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    expert = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    start = tl.load(bounds_ptr + expert)
    end = tl.load(bounds_ptr + expert + 1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        rows_in = tl.load(in_row_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        rows_out = tl.load(out_row_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        a = tl.load(
            x_ptr + rows_in[None, :] * stride_xm + offs_k[:, None] * stride_xk,
            mask=mask_k[:, None] & mask_m[None, :],
            other=0.0,
        )
        b = tl.load(
            g_ptr + rows_out[:, None] * stride_gm + offs_n[None, :] * stride_gn,
            mask=mask_m[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    tl.store(
        dw_ptr + expert * stride_de + offs_k[:, None] * stride_dk + offs_n[None, :] * stride_dn,
        acc.to(dw_ptr.dtype.element_ty),
        mask=mask_k[:, None] & mask_n[None, :],
    )


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _block_sizes(k: int, n: int, config: Sequence[int] | None = None) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for a problem size: ``config`` where
    given (checked by the caller), else chosen here.

    Rows per expert are the variable part; widths are fixed by the model. Small blocks under the
    interpreter keep the CPU tests fast.
    """
    if config is not None:
        return tuple(config)
    if not torch.cuda.is_available() or interpreting():
        return 16, 16, 16, 1, 1
    block_n = 128 if n >= 128 else max(16, next_power_of_2(n))
    block_k = 64 if k >= 64 else max(16, next_power_of_2(k))
    return 64, block_n, block_k, 4, 3


def gather_mm(
    x: torch.Tensor,
    weight: torch.Tensor,
    expert_sorted: torch.Tensor,
    in_row: torch.Tensor,
    out_row: torch.Tensor,
    bounds: torch.Tensor,
    n_out: int,
    *,
    config: Sequence[int] | None = None,
) -> torch.Tensor:
    """``out[out_row[p]] = x[in_row[p]] @ weight[expert_sorted[p]]`` for all sorted positions p.

    Args:
        x: ``[M, K]`` rows (any strides).
        weight: ``[E, K, N]`` (any strides; a transposed view works without a copy), in
            ``x.dtype`` or a wider float dtype (cast tile by tile in the kernel).
        expert_sorted, in_row, out_row: ``[P]`` each, ``expert_sorted`` ascending.
        bounds: ``[E + 1]`` expert run boundaries from ``layout.expert_bounds``.
        n_out: rows of the output; rows that no position writes are zero.
        config: ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` for this launch (see
            ``validation.check_launch_config``); by default chosen from the problem size.

    Returns:
        ``[n_out, N]`` in ``x.dtype``.
    """
    m_k, n = weight.shape[1], weight.shape[2]
    p = expert_sorted.numel()
    out = x.new_zeros(n_out, n) if p < n_out else x.new_empty(n_out, n)
    if p == 0 or n == 0:
        return out
    if m_k == 0:
        return out.zero_()
    block_m, block_n, block_k, warps, stages = _block_sizes(m_k, n, config)
    n_experts = bounds.numel() - 1
    grid = (cdiv(p, block_m) + n_experts, cdiv(n, block_n))
    _gather_mm_kernel[grid](
        x,
        weight,
        out,
        in_row,
        out_row,
        bounds,
        n_experts,
        m_k,
        n,
        *x.stride(),
        *weight.stride(),
        *out.stride(),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_E=next_power_of_2(n_experts + 1),
        INPUT_PRECISION=_input_precision(x.dtype),
        num_warps=warps,
        num_stages=stages,
    )
    return out


def expert_weight_grad(
    x: torch.Tensor,
    grad: torch.Tensor,
    expert_sorted: torch.Tensor,
    in_row: torch.Tensor,
    out_row: torch.Tensor,
    bounds: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    *,
    config: Sequence[int] | None = None,
) -> torch.Tensor:
    """``dW[e] = sum_{p: expert p == e} x[in_row[p]]^T grad[out_row[p]]``, shape ``[E, K, N]``,
    accumulated in fp32 and stored in ``out_dtype`` (default ``x.dtype``). ``config`` as in
    :func:`gather_mm` (its ``BLOCK_M``: the rows summed per step)."""
    k, n = x.shape[1], grad.shape[1]
    n_experts = bounds.numel() - 1
    dw = torch.empty(n_experts, k, n, dtype=out_dtype or x.dtype, device=x.device)
    if n_experts == 0 or k == 0 or n == 0:
        return dw.zero_()
    block_m, block_n, block_k, warps, stages = _block_sizes(k, n, config)
    if config is None:
        block_m = 64 if block_k >= 64 and not interpreting() else 16
    grid = (n_experts, cdiv(k, block_k), cdiv(n, block_n))
    _expert_weight_grad_kernel[grid](
        x,
        grad,
        dw,
        in_row,
        out_row,
        bounds,
        k,
        n,
        *x.stride(),
        *grad.stride(),
        *dw.stride(),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        INPUT_PRECISION=_input_precision(x.dtype),
        num_warps=warps,
        num_stages=stages,
    )
    return dw
