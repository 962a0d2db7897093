"""The Triton kernels of :func:`cvmm_kernel.router.sigmoid_topk`: the top-k choice and the gates
of a sigmoid router in one pass over the logits, and the gates' gradient written back as whole
rows of the logits' gradient."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .host_math import cdiv
from .launcher import launch
from .topk_triton import (
    key_bits,
    rank_keys,
    ranking_scores,
    row_blocks,
    take_best_key,
    take_best_score,
)
from .traced_ops import is_traced, launch_traced


@triton.jit
def _sigmoid_topk_kernel(
    logits_ptr, drop_ptr, index_ptr, gate_ptr, R, E, G, stride_o, stride_g,
    K: tl.constexpr, HAS_DROP: tl.constexpr, GLOBAL_INDEX: tl.constexpr, KEY_BITS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """Rows ``r = o * G + g`` at ``o * stride_o + g * stride_g`` (columns contiguous), ``BLOCK_R``
    per program, each whole in registers. ``K`` times: the largest logit not yet taken (NaN
    first, dropped experts last, the lowest index among equals) gives ``index`` (plus ``g * E``
    with ``GLOBAL_INDEX``) and ``gate = sigmoid(logit)``."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < R
    valid = row_ok[:, None] & (cols[None, :] < E)
    offs = (rows // G).to(tl.int64) * stride_o + (rows % G).to(tl.int64) * stride_g
    x = tl.load(logits_ptr + offs[:, None] + cols[None, :], mask=valid, other=float("-inf"))
    if HAS_DROP:
        dropped = tl.load(drop_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], mask=valid)
        x = tl.where(dropped != 0, float("-inf"), x).to(x.dtype)
    base = (rows % G).to(tl.int64) * E if GLOBAL_INDEX else tl.zeros_like(rows).to(tl.int64)
    out = rows.to(tl.int64) * K
    if KEY_BITS == 0:
        _sigmoid_top_scores(x, cols, valid, logits_ptr, offs, base, out, row_ok, index_ptr,
                            gate_ptr, K, BLOCK_E)  # fmt: skip
    else:
        keys = rank_keys(x, cols[None, :], valid, KEY_BITS)
        _sigmoid_top_keys(keys, logits_ptr, offs, base, out, row_ok, index_ptr, gate_ptr, K,
                          KEY_BITS)  # fmt: skip


@triton.jit
def _store_choice(index, j, logits_ptr, offs, base, out, row_ok, index_ptr, gate_ptr):
    """Round ``j``'s choice ``index`` and its gate: the chosen logit itself (NaN stays NaN),
    one cached load per row rather than a reduction."""
    logit = tl.load(logits_ptr + offs + index, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(index_ptr + out + j, index.to(tl.int64) + base, mask=row_ok)
    gate = tl.sigmoid(logit)
    tl.store(gate_ptr + out + j, gate.to(gate_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _sigmoid_top_keys(keys, logits_ptr, offs, base, out, row_ok, index_ptr, gate_ptr,
                      K: tl.constexpr, KEY_BITS: tl.constexpr):  # fmt: skip
    """One max-reduction of the ranking keys per round (``topk_triton.rank_keys``)."""
    floor = tl.min(keys, axis=1)
    for j in range(K):
        index, keys = take_best_key(keys, floor, KEY_BITS)
        _store_choice(index, j, logits_ptr, offs, base, out, row_ok, index_ptr, gate_ptr)


@triton.jit
def _sigmoid_top_scores(x, cols, valid, logits_ptr, offs, base, out, row_ok, index_ptr, gate_ptr,
                        K: tl.constexpr, BLOCK_E: tl.constexpr):  # fmt: skip
    """Two reductions per round: the largest logit not yet taken, the lowest column holding it."""
    key = ranking_scores(x)
    taken = ~valid  # padding is never a candidate
    for j in range(K):
        index, taken = take_best_score(key, taken, cols, BLOCK_E)
        _store_choice(index, j, logits_ptr, offs, base, out, row_ok, index_ptr, gate_ptr)


@triton.jit
def _gate_grad_rows_kernel(
    index_ptr, gate_ptr, dgate_ptr, dlogits_ptr, R, E, G,
    K: tl.constexpr, GLOBAL_INDEX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """``dlogits [R, E]`` (contiguous): ``dgate * gate * (1 - gate)`` at the chosen columns, 0
    elsewhere (the sigmoid's derivative from its output, as autograd's)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < R
    base = (rows % G).to(tl.int64) * E if GLOBAL_INDEX else tl.zeros_like(rows).to(tl.int64)
    acc = tl.zeros((BLOCK_R, BLOCK_E), dtype=tl.float32)
    slots = rows.to(tl.int64) * K
    for j in tl.static_range(K):
        index = tl.load(index_ptr + slots + j, mask=row_ok, other=-1) - base
        s = tl.load(gate_ptr + slots + j, mask=row_ok, other=0.0).to(tl.float32)
        dg = tl.load(dgate_ptr + slots + j, mask=row_ok, other=0.0).to(tl.float32)
        acc += tl.where(cols[None, :] == index[:, None], (dg * s * (1.0 - s))[:, None], 0.0)
    mask = row_ok[:, None] & (cols[None, :] < E)
    ptrs = dlogits_ptr + rows[:, None].to(tl.int64) * E + cols[None, :]
    tl.store(ptrs, acc.to(dlogits_ptr.dtype.element_ty), mask=mask)


def sigmoid_topk_forward(
    logits: torch.Tensor, drop: torch.Tensor | None, k: int, global_index: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits [O, G, E]`` (any strides over ``O`` and ``G``, contiguous columns), ``drop``
    ``[O * G, E]`` contiguous bool or None -> ``(index [O * G, k] int64, gate [O * G, k])``."""
    n_outer, groups, width = logits.shape
    n_rows = n_outer * groups
    index = torch.empty(n_rows, k, dtype=torch.int64, device=logits.device)
    gate = torch.empty(n_rows, k, dtype=logits.dtype, device=logits.device)
    block_r, block_e = row_blocks(width)
    (launch_traced if is_traced(logits) else launch)(
        _sigmoid_topk_kernel, (cdiv(n_rows, block_r),),
        logits, drop if drop is not None else logits, index, gate, n_rows, width, groups,
        logits.stride(0), logits.stride(1), k, drop is not None, global_index,
        key_bits(logits.dtype, width), block_r, block_e,
    )  # fmt: skip
    return index, gate


def sigmoid_topk_backward(
    index: torch.Tensor, gate: torch.Tensor, dgate: torch.Tensor, width: int, groups: int,
    global_index: bool,
) -> torch.Tensor:  # fmt: skip
    """``index, gate, dgate [R, k]`` (contiguous) -> ``dlogits [R, width]`` in ``gate``'s
    dtype."""
    n_rows, k = index.shape
    dlogits = torch.empty(n_rows, width, dtype=gate.dtype, device=gate.device)
    block_r, block_e = row_blocks(width)
    (launch_traced if is_traced(gate) else launch)(
        _gate_grad_rows_kernel, (cdiv(n_rows, block_r),),
        index, gate, dgate, dlogits, n_rows, width, groups, k, global_index, block_r, block_e,
    )  # fmt: skip
    return dlogits
