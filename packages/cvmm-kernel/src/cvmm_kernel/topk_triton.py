"""The Triton kernel of :func:`cvmm_kernel.topk.topk_indices`, and the ranking keys it shares
with :mod:`cvmm_kernel.router_triton`.

Each of the ``k`` rounds of a top-k over a row held in registers is one max-reduction: every
score becomes a distinct integer key, its order-preserving bits high and the complement of its
column low, so the largest key is the largest score and, among equal scores, the lowest column.
16-bit scores fit with their column in an int32, float32 ones in an int64; float64 scores keep
two reductions per round (the largest score, then the lowest column holding it). On an H100 at
MoEUT-244M's router shape (8192 rows of 387, k = 16) the bf16 top-k takes 25 us instead of 79
(fp32: 67 instead of 81), the same indices (benchmarks/results/ab_topk_keys.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .host_math import cdiv, next_power_of_2
from .launcher import launch
from .traced_ops import is_traced, launch_traced

# Lab switch (benchmarks/ab_topk_keys.py): False ranks every dtype by two reductions per round.
PACKED_KEYS = [True]


def key_bits(dtype: torch.dtype, width: int) -> int:
    """Bits of a score's ranking key for rows of ``width`` scores: 16 or 32 (packed with the
    column), 0 for two reductions per round: float64, float32 rows of at most 64 (where the
    int64 keys' reductions cost more than they save), and every dtype with ``PACKED_KEYS[0]``
    off."""
    if not PACKED_KEYS[0] or dtype.itemsize > 4 or (dtype.itemsize == 4 and width <= 64):
        return 0
    return 8 * dtype.itemsize


@triton.jit
def rank_keys(x, cols, valid, KEY_BITS: tl.constexpr):
    """Distinct integer keys of scores ``x`` (16- or 32-bit floats; NaN ranks as +inf and -0.0 as
    +0.0): the largest key is the largest score, the lowest of ``cols`` among equal ones. Entries
    that are not ``valid`` get the smallest key, below every score's (-inf included)."""
    x = tl.where(x != x, float("inf"), x).to(x.dtype)
    if KEY_BITS == 16:
        bits = x.to(tl.int16, bitcast=True).to(tl.int32)
        bits = tl.where(bits == -32768, 0, bits)  # -0.0's bits as +0.0's
        high = tl.where(bits < 0, bits ^ 0x7FFF, bits)  # order-preserving: negatives reversed
        high = tl.where(valid, high, -32768)  # the key of no score (that of a NaN's bits)
        low = tl.where(valid, 65535 - cols, 0)
        return high * 65536 + low
    else:
        bits = x.to(tl.int32, bitcast=True)
        bits = tl.where(bits == -2147483648, 0, bits)
        high = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        high = tl.where(valid, high, -2147483648)
        low = tl.where(valid, 4294967295 - cols.to(tl.int64), 0)
        return (high.to(tl.int64) << 32) | low


@triton.jit
def key_column(best, KEY_BITS: tl.constexpr):
    """The column packed into the keys ``best`` (int32)."""
    if KEY_BITS == 16:
        return 65535 - (best & 65535)
    else:
        return (4294967295 - (best & 4294967295)).to(tl.int32)


@triton.jit
def take_best_key(keys, floor, KEY_BITS: tl.constexpr):
    """One round over distinct ``keys``: ``(column of each row's largest key, the keys with that
    one lowered to the row's ``floor``)`` (``floor``: the padding's key or lower, never chosen
    while a score remains)."""
    best = tl.max(keys, axis=1)
    return key_column(best, KEY_BITS), tl.where(keys == best[:, None], floor[:, None], keys)


@triton.jit
def ranking_scores(x):
    """Scores as the two-reduction rounds compare them: float32 (float64 kept), NaN as +inf (it
    ranks first, as in torch.topk)."""
    if x.dtype != tl.float64:
        x = x.to(tl.float32)
    return tl.where(x != x, float("inf"), x)


@triton.jit
def take_best_score(x, taken, cols, BLOCK_E: tl.constexpr):
    """One round of two reductions: ``(column of the largest score not yet taken, the lowest
    among equals (possibly -inf), the taken mask with it added)``."""
    best = tl.max(tl.where(taken, float("-inf"), x), axis=1)
    hit = (x == best[:, None]) & ~taken
    index = tl.min(tl.where(hit, cols[None, :], BLOCK_E), axis=1)
    return index, taken | (cols[None, :] == index[:, None])


@triton.jit
def _top_keys_rounds(keys, rows, row_ok, out_ptr, K: tl.constexpr, KEY_BITS: tl.constexpr):
    floor = tl.min(keys, axis=1)
    for j in range(K):
        index, keys = take_best_key(keys, floor, KEY_BITS)
        tl.store(out_ptr + rows.to(tl.int64) * K + j, index.to(tl.int64), mask=row_ok)


@triton.jit
def _top_scores_rounds(x, cols, valid, rows, row_ok, out_ptr, K: tl.constexpr,
                       BLOCK_E: tl.constexpr):  # fmt: skip
    x = ranking_scores(x)
    taken = ~valid  # padding is never a candidate
    for j in range(K):
        index, taken = take_best_score(x, taken, cols, BLOCK_E)
        tl.store(out_ptr + rows.to(tl.int64) * K + j, index.to(tl.int64), mask=row_ok)


@triton.jit
def _topk_indices_kernel(
    scores_ptr,
    out_ptr,
    R,
    E,
    stride_r,
    K: tl.constexpr,
    KEY_BITS: tl.constexpr,
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
    )
    if KEY_BITS == 0:
        _top_scores_rounds(x, cols, valid, rows, row_ok, out_ptr, K, BLOCK_E)
    else:
        keys = rank_keys(x, cols[None, :], valid, KEY_BITS)
        _top_keys_rounds(keys, rows, row_ok, out_ptr, K, KEY_BITS)


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
    # traced: the custom op's body traced for torch.compile
    (launch_traced if is_traced(rows) else launch)(
        _topk_indices_kernel, (cdiv(n_rows, block_r),),
        rows, out, n_rows, width, rows.stride(0), k, key_bits(rows.dtype, width), block_r,
        block_e, num_warps=4,
    )  # fmt: skip
