"""Triton kernels of :func:`switchhead.topk_gates.topk_gates` (see there for the maths).

``logits`` is a 3-D view ``[M, G, E]`` with arbitrary strides (no copy); a program handles
``BLOCK_R`` rows ``(m, g)`` with all ``E`` experts in registers. The top-k test ranks every expert
against all others of its row (``[BLOCK_R, E, E]`` comparisons): a higher score wins, equal
scores go to the lower expert index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scores_and_keep(
    l_ptr, rows, n_rows, n_groups, sl_m, sl_g, sl_e, E, K: tl.constexpr, BLOCK_E: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    cols = tl.arange(0, BLOCK_E)
    m = rows // n_groups
    g = rows % n_groups
    ok = (rows < n_rows)[:, None] & (cols[None, :] < E)
    logits = tl.load(
        l_ptr + (m * sl_m + g * sl_g)[:, None] + cols[None, :] * sl_e, mask=ok, other=0.0
    ).to(ACC)
    s = 1.0 / (1.0 + tl.exp(-logits))
    s_rank = tl.where(ok, s, -1.0)  # padding columns never beat a real expert
    a = s_rank[:, :, None]  # the expert being ranked
    b = s_rank[:, None, :]  # its rivals
    ia = cols[None, :, None]
    ib = cols[None, None, :]
    beats = (b > a) | ((b == a) & (ib < ia))
    rank = tl.sum(beats.to(tl.int32), axis=2)
    keep = (rank < K) & ok
    return s, keep, ok, m, g


@triton.jit
def _topk_gates_fwd_kernel(
    l_ptr, out_ptr, n_rows, n_groups, E,
    sl_m, sl_g, sl_e, so_m, so_g, so_e,
    K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    s, keep, ok, m, g = _scores_and_keep(
        l_ptr, rows, n_rows, n_groups, sl_m, sl_g, sl_e, E, K, BLOCK_E, ACC
    )
    gates = tl.where(keep, s, 0.0)
    offs = (m * so_m + g * so_g)[:, None] + cols[None, :] * so_e
    tl.store(out_ptr + offs, gates.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _topk_gates_bwd_kernel(
    l_ptr, dg_ptr, dl_ptr, n_rows, n_groups, E,
    sl_m, sl_g, sl_e, sd_m, sd_g, sd_e, so_m, so_g, so_e,
    K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    s, keep, ok, m, g = _scores_and_keep(
        l_ptr, rows, n_rows, n_groups, sl_m, sl_g, sl_e, E, K, BLOCK_E, ACC
    )
    dg = tl.load(
        dg_ptr + (m * sd_m + g * sd_g)[:, None] + cols[None, :] * sd_e, mask=ok, other=0.0
    ).to(ACC)
    dl = tl.where(keep, dg * s * (1.0 - s), 0.0)
    offs = (m * so_m + g * so_g)[:, None] + cols[None, :] * so_e
    tl.store(dl_ptr + offs, dl.to(dl_ptr.dtype.element_ty), mask=ok)


def _config(e: int, dtype: torch.dtype):
    block_e = max(2, triton.next_power_of_2(e))
    block_r = max(1, 4096 // (block_e * block_e))
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    return block_r, block_e, acc


def topk_gates_fwd(logits: torch.Tensor, k: int, out_dtype: torch.dtype) -> torch.Tensor:
    """``logits [M, G, E]`` -> gates ``[M, G, E]`` (contiguous, ``out_dtype``)."""
    m, g, e = logits.shape
    out = torch.empty(m, g, e, device=logits.device, dtype=out_dtype)
    block_r, block_e, acc = _config(e, out_dtype)
    grid = (triton.cdiv(m * g, block_r),)
    _topk_gates_fwd_kernel[grid](
        logits, out, m * g, g, e, *logits.stride(), *out.stride(),
        K=k, BLOCK_R=block_r, BLOCK_E=block_e, ACC=acc,
    )  # fmt: skip
    return out


def topk_gates_bwd(logits: torch.Tensor, grad: torch.Tensor, k: int) -> torch.Tensor:
    """Gradient of the logits (``logits.dtype``, contiguous) from that of the gates."""
    m, g, e = logits.shape
    out = torch.empty(m, g, e, device=logits.device, dtype=logits.dtype)
    block_r, block_e, acc = _config(e, torch.promote_types(grad.dtype, logits.dtype))
    grid = (triton.cdiv(m * g, block_r),)
    _topk_gates_bwd_kernel[grid](
        logits, grad, out, m * g, g, e, *logits.stride(), *grad.stride(), *out.stride(),
        K=k, BLOCK_R=block_r, BLOCK_E=block_e, ACC=acc,
    )  # fmt: skip
    return out
