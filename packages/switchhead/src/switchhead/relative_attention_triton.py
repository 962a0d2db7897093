"""Flash-style Transformer-XL relative-position attention in Triton (forward and backward).

The score of query ``i`` and key ``j`` (natural-log units) is

    s_ij = scale * q_i . k_j + q_i . r[c(i, j)],   c(i, j) = j - i + L - 1,

with ``r [H, P, D]`` (``P = L + S - 1``) the projected relative-position embeddings, already
multiplied by the scale. Entry ``(i, j)`` of the positional scores sits at column ``j - i`` of the
plain product ``q r^T``: a shift by the row index, which a register tile cannot do cheaply
(``tl.gather`` made the forward 1.5x slower on an H100). Global memory does it: a program writes
the product ``q_blk @ r_band^T`` of its block of queries to a scratch block of its own with the
row shift applied on the *store* (``[a, u] -> [a, u + a - (BLOCK_M - 1)]``, scalar stores, which
the program never waits on), and reads it back in key order with plain aligned vector loads.

- Forward and ``dq`` (one program per block of ``BLOCK_M`` queries, persistent grid, heaviest
  blocks first): the positional scores of every key the block sees are staged once, in key order
  (``[BLOCK_M, width]`` per program, in the inputs' dtype), before the FlashAttention loop over key
  blocks. Key blocks that every query of the block sees whole (no mask, no causal edge, no
  partial block) take a loop without masks.
- ``dq``, ``dr``: the loop over key blocks accumulates the content part of ``dq`` and stores
  ``dS`` shifted into a second scratch, which then holds ``dS`` by relative position; a last pass
  over that block gives the positional part of ``dq`` and the program's share of ``dr``, added to a
  float32 buffer with atomics (so ``dr`` is not bitwise reproducible run to run).
- ``dk``, ``dv`` (one program per block of ``BLOCK_N`` keys, persistent grid): the loop over query
  blocks recomputes the tile's scores; its positional part is the band ``q_blk @ r[c0 : c0 +
  BLOCK_M + BLOCK_N - 1]^T`` written shifted to a ``[BLOCK_M, BLOCK_N]`` scratch tile (two of them,
  alternating by iteration, so one barrier per tile orders them) and read back. ``dk`` and ``dv``
  are accumulated in registers and written once, in the inputs' dtype: no atomics.

Layouts: ``q [B, H, L, D]``, ``k [B, H, S, D]``, ``v [B, H, S, Dv]``, ``r [H, P, D]`` (any
strides), ``keep`` an optional ``uint8`` mask viewed as ``[B, H, L, S]`` (broadcast dimensions
with stride 0). Causal masking is bottom-right aligned: query ``i`` sees keys ``j <= i + S - L``.
A row that sees no key is 0. Head dims up to 256. Float literals in the kernels are
fp32-representable; offsets into the inputs are int64, offsets inside a program's scratch block
int32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from cvmm_kernel.host_math import cdiv, next_power_of_2
from cvmm_kernel.interpreter import interpreting
from cvmm_kernel.launcher import multiprocessors

from .triton_support import row_alignment

LOG2E = 1.4426950408889634  # host side only; the kernels write their constants as literals


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` in float32; exact float32 products (no TF32) for float32 inputs."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _rows(base, idx, stride, ALIGN: tl.constexpr):
    """Element offsets ``base + idx * stride`` (int64) of rows that start ``ALIGN``-aligned (the
    launcher checks the strides), so that the loads and stores along a row move in vectors."""
    return tl.multiple_of(base + idx.to(tl.int64) * stride, ALIGN)


@triton.jit
def _band(R, r_off, c0, P, srp, srd, offs_d, d_ok, WIDTH: tl.constexpr, ALIGN: tl.constexpr):
    """Rows ``c0 .. c0 + WIDTH - 1`` of ``r`` (head at ``r_off``) as ``[WIDTH, BLOCK_D]`` (zero
    outside ``[0, P)``)."""
    c = c0 + tl.arange(0, WIDTH)
    ok = (c >= 0) & (c < P)
    mask = ok[:, None] & d_ok[None, :]
    rows = _rows(r_off, c, srp, ALIGN)
    return tl.load(R + rows[:, None] + offs_d[None, :] * srd, mask=mask, other=0.0)


@triton.jit
def _keep(
    KEEP, b, h, rows, cols, m_ok, n_ok, shift, smb, smh, smm, smn,
    CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr,
):  # fmt: skip
    """``[len(rows), len(cols)]``: which (query, key) pairs are attended."""
    keep = m_ok[:, None] & n_ok[None, :]
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None] + shift)
    if HAS_KEEP:
        given = tl.load(
            KEEP + b * smb + h * smh + rows[:, None].to(tl.int64) * smm
            + cols[None, :].to(tl.int64) * smn,
            mask=keep,
            other=0,
        )  # fmt: skip
        keep = keep & (given != 0)
    return keep


@triton.jit
def _stage_positions(
    q, R, r_off, scratch, c_lo, hi, n_pos, width, srp, srd, offs_d, d_ok,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """``scratch[a, j] = q_a . r[c_lo + j - a + BLOCK_M - 1]`` for keys ``j < hi``: the positional
    scores of the query block in key order (``c_lo``: the position of column 0 of the last row)."""
    rows = tl.arange(0, BLOCK_M)
    w = tl.arange(0, CHUNK)
    for u0 in range(0, hi + BLOCK_M - 1, CHUNK):
        band = _band(R, r_off, c_lo + u0, n_pos, srp, srd, offs_d, d_ok, CHUNK, ALIGN)
        scores = _dot(q, tl.trans(band), IEEE)
        key = u0 + w[None, :] + rows[:, None] - (BLOCK_M - 1)
        tl.store(scratch + rows[:, None] * width + key, scores.to(scratch.dtype.element_ty),
                 mask=(key >= 0) & (key < hi))  # fmt: skip


@triton.jit
def _query_block(work, n_m, H, L, S, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Work item -> ``(b, h, bh, start_m, hi)``: the heaviest query blocks come first; ``hi`` is
    the end of the keys the block sees."""
    bh = (work // n_m).to(tl.int64)
    start_m = (n_m - 1 - work % n_m) * BLOCK_M
    hi = S
    if CAUSAL:
        hi = tl.maximum(tl.minimum(S, start_m + BLOCK_M + S - L), 0)
    return bh // H, bh % H, bh, start_m, hi


@triton.jit
def _whole_keys(start_m, hi, S, L, CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr,
                BLOCK_N: tl.constexpr):  # fmt: skip
    """End of the leading key blocks that every query of the block at ``start_m`` sees whole:
    they need no mask."""
    if HAS_KEEP:
        return 0
    end = S
    if CAUSAL:
        end = tl.maximum(tl.minimum(S, start_m + 1 + S - L), 0)
    return tl.minimum(end, hi) // BLOCK_N * BLOCK_N


@triton.jit
def _fwd_tile(
    acc, m_i, l_i, q, K, V, k_off, v_off, KEEP, scratch, b, h, start_n, offs_m, m_ok, rows, width,
    S, shift, skn, skd, svn, svd, smb, smh, smm, smn, offs_d, d_ok, offs_dv, dv_ok, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    cols = tl.multiple_of(start_n, BLOCK_N) + tl.arange(0, BLOCK_N)
    n_ok = cols < S
    if MASKED:
        kt_mask = n_ok[None, :] & d_ok[:, None]
        v_mask = n_ok[:, None] & dv_ok[None, :]
    else:
        kt_mask = d_ok[:, None]
        v_mask = dv_ok[None, :]
    kt = tl.load(K + _rows(k_off, cols, skn, ALIGN)[None, :] + offs_d[:, None] * skd, mask=kt_mask,
                 other=0.0)  # fmt: skip
    pos_at = scratch + rows[:, None] * width + cols[None, :]
    if MASKED:  # the staged scores cover only the attended keys
        keep = _keep(KEEP, b, h, offs_m, cols, m_ok, n_ok, shift, smb, smh, smm, smn, CAUSAL,
                     HAS_KEEP)  # fmt: skip
        pos = tl.load(pos_at, mask=keep, other=0.0)
    else:
        pos = tl.load(pos_at)
    s = _dot(q, kt, IEEE) * qk_scale + pos.to(tl.float32) * 1.4426950408889634
    if MASKED:
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + _rows(v_off, cols, svn, ALIGN)[:, None] + offs_dv[None, :] * svd, mask=v_mask,
                other=0.0)  # fmt: skip
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, R, KEEP, OUT, LSE, SCRATCH,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    srh, srp, srd,
    smb, smh, smm, smn,
    sob, soh, som, sod,
    H, L, S, n_work, width, qk_scale,
    D: tl.constexpr, D_V: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ALIGN: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    d_ok = offs_d < D
    dv_ok = offs_dv < D_V
    scratch = SCRATCH + pid.to(tl.int64) * BLOCK_M * width
    n_pos = L + S - 1
    shift = S - L
    n_m = tl.cdiv(L, BLOCK_M)
    for work in range(pid, n_work, tl.num_programs(0)):
        b, h, bh, start_m, hi = _query_block(work, n_m, H, L, S, CAUSAL, BLOCK_M)
        offs_m = start_m + rows
        m_ok = offs_m < L
        q_rows = _rows(b * sqb + h * sqh, offs_m, sqm, ALIGN)
        q = tl.load(Q + q_rows[:, None] + offs_d[None, :] * sqd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
        _stage_positions(q, R, h * srh, scratch, L - start_m - BLOCK_M, hi, n_pos, width, srp,
                         srd, offs_d, d_ok, IEEE, BLOCK_M, BLOCK_N, ALIGN)  # fmt: skip
        tl.debug_barrier()
        k_off = b * skb + h * skh
        v_off = b * svb + h * svh
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        whole = _whole_keys(start_m, hi, S, L, CAUSAL, HAS_KEEP, BLOCK_N)
        for start_n in range(0, whole, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(
                acc, m_i, l_i, q, K, V, k_off, v_off, KEEP, scratch, b, h, start_n, offs_m, m_ok,
                rows, width, S, shift, skn, skd, svn, svd, smb, smh, smm, smn, offs_d, d_ok,
                offs_dv, dv_ok, qk_scale, False, CAUSAL, HAS_KEEP, IEEE, BLOCK_N, ALIGN,
            )  # fmt: skip
        for start_n in range(whole, hi, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(
                acc, m_i, l_i, q, K, V, k_off, v_off, KEEP, scratch, b, h, start_n, offs_m, m_ok,
                rows, width, S, shift, skn, skd, svn, svd, smb, smh, smm, smn, offs_d, d_ok,
                offs_dv, dv_ok, qk_scale, True, CAUSAL, HAS_KEEP, IEEE, BLOCK_N, ALIGN,
            )  # fmt: skip
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural log; -inf for a row with no key
        tl.store(LSE + bh * L + offs_m, lse, mask=m_ok)
        tl.store(
            OUT + _rows(b * sob + h * soh, offs_m, som, ALIGN)[:, None] + offs_dv[None, :] * sod,
            out.to(OUT.dtype.element_ty),
            mask=m_ok[:, None] & dv_ok[None, :],
        )
        tl.debug_barrier()  # the scratch is rewritten by the next work item


@triton.jit
def _dq_tile(
    dq, q, do, lse, delta, K, V, k_off, v_off, KEEP, pos_s, ds_s, b, h, start_n, offs_m, m_ok,
    rows, width, S, shift, skn, skd, svn, svd, smb, smh, smm, smn, offs_d, d_ok, offs_dv, dv_ok,
    qk_scale, sm_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    cols = tl.multiple_of(start_n, BLOCK_N) + tl.arange(0, BLOCK_N)
    n_ok = cols < S
    if MASKED:
        k_mask = n_ok[:, None] & d_ok[None, :]
        v_mask = n_ok[:, None] & dv_ok[None, :]
    else:
        k_mask = d_ok[None, :]
        v_mask = dv_ok[None, :]
    k = tl.load(K + _rows(k_off, cols, skn, ALIGN)[:, None] + offs_d[None, :] * skd, mask=k_mask,
                other=0.0)  # fmt: skip
    v = tl.load(V + _rows(v_off, cols, svn, ALIGN)[:, None] + offs_dv[None, :] * svd, mask=v_mask,
                other=0.0)  # fmt: skip
    pos_at = pos_s + rows[:, None] * width + cols[None, :]
    if MASKED:  # the staged scores cover only the attended keys
        keep = _keep(KEEP, b, h, offs_m, cols, m_ok, n_ok, shift, smb, smh, smm, smn, CAUSAL,
                     HAS_KEEP)  # fmt: skip
        pos = tl.load(pos_at, mask=keep, other=0.0)
    else:
        pos = tl.load(pos_at)
    s = _dot(q, tl.trans(k), IEEE) * qk_scale + pos.to(tl.float32) * 1.4426950408889634
    p = tl.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where(keep, p, 0.0)
    ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
    dq += _dot((ds * sm_scale).to(q.dtype), k, IEEE)
    # dS by relative position: row a, column j - a + BLOCK_M - 1
    tl.store(ds_s + rows[:, None] * width + cols[None, :] - rows[:, None] + (BLOCK_M - 1),
             ds.to(ds_s.dtype.element_ty))  # fmt: skip
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, R, KEEP, DO, LSE, DELTA, DQ, DR, POS, DS,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    srh, srp, srd,
    smb, smh, smm, smn,
    sdob, sdoh, sdom, sdod,
    sdqb, sdqh, sdqm, sdqd,
    H, L, S, n_work, width, qk_scale, sm_scale,
    D: tl.constexpr, D_V: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ALIGN: tl.constexpr,
):  # fmt: skip
    """``DQ`` in q's dtype; ``DR [H, P, D]`` float32, contiguous and zeroed (added to
    atomically); ``POS``, ``DS`` one ``[BLOCK_M, width]`` scratch block per program each."""
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    w = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    d_ok = offs_d < D
    dv_ok = offs_dv < D_V
    pos_s = POS + pid.to(tl.int64) * BLOCK_M * width
    ds_s = DS + pid.to(tl.int64) * BLOCK_M * width
    n_pos = L + S - 1
    shift = S - L
    n_m = tl.cdiv(L, BLOCK_M)
    for work in range(pid, n_work, tl.num_programs(0)):
        b, h, bh, start_m, hi = _query_block(work, n_m, H, L, S, CAUSAL, BLOCK_M)
        offs_m = start_m + rows
        m_ok = offs_m < L
        q_mask = m_ok[:, None] & d_ok[None, :]
        q_rows = _rows(b * sqb + h * sqh, offs_m, sqm, ALIGN)
        q = tl.load(Q + q_rows[:, None] + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
        do = tl.load(
            DO + _rows(b * sdob + h * sdoh, offs_m, sdom, ALIGN)[:, None] + offs_dv[None, :] * sdod,
            mask=m_ok[:, None] & dv_ok[None, :],
            other=0.0,
        )
        lse = tl.load(LSE + bh * L + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + bh * L + offs_m, mask=m_ok, other=0.0)
        c_lo = L - start_m - BLOCK_M
        r_off = h * srh
        _stage_positions(q, R, r_off, pos_s, c_lo, hi, n_pos, width, srp, srd, offs_d, d_ok, IEEE,
                         BLOCK_M, BLOCK_N, ALIGN)  # fmt: skip
        tl.debug_barrier()
        k_off = b * skb + h * skh
        v_off = b * svb + h * svh
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        whole = _whole_keys(start_m, hi, S, L, CAUSAL, HAS_KEEP, BLOCK_N)
        for start_n in range(0, whole, BLOCK_N):
            dq = _dq_tile(
                dq, q, do, lse, delta, K, V, k_off, v_off, KEEP, pos_s, ds_s, b, h, start_n, offs_m,
                m_ok, rows, width, S, shift, skn, skd, svn, svd, smb, smh, smm, smn, offs_d, d_ok,
                offs_dv, dv_ok, qk_scale, sm_scale, False, CAUSAL, HAS_KEEP, IEEE, BLOCK_M,
                BLOCK_N, ALIGN,
            )  # fmt: skip
        for start_n in range(whole, hi, BLOCK_N):
            dq = _dq_tile(
                dq, q, do, lse, delta, K, V, k_off, v_off, KEEP, pos_s, ds_s, b, h, start_n, offs_m,
                m_ok, rows, width, S, shift, skn, skd, svn, svd, smb, smh, smm, smn, offs_d, d_ok,
                offs_dv, dv_ok, qk_scale, sm_scale, True, CAUSAL, HAS_KEEP, IEEE, BLOCK_M,
                BLOCK_N, ALIGN,
            )  # fmt: skip
        tl.debug_barrier()
        # dS by relative position: column u of row a is key u + a - (BLOCK_M - 1); the columns
        # of keys outside [0, hi) were never written
        for u0 in range(0, hi + BLOCK_M - 1, BLOCK_N):
            key = u0 + w[None, :] + rows[:, None] - (BLOCK_M - 1)
            ds_rel = tl.load(ds_s + rows[:, None] * width + u0 + w[None, :])
            ds_rel = tl.where((key >= 0) & (key < hi), ds_rel, 0.0).to(q.dtype)
            band = _band(R, r_off, c_lo + u0, n_pos, srp, srd, offs_d, d_ok, BLOCK_N, ALIGN)
            dq += _dot(ds_rel, band, IEEE)
            c = c_lo + u0 + w.to(tl.int64)
            dr_ok = ((c >= 0) & (c < n_pos))[:, None] & d_ok[None, :]
            tl.atomic_add(DR + (h * n_pos + c[:, None]) * D + offs_d[None, :],
                          _dot(tl.trans(ds_rel), q, IEEE), mask=dr_ok, sem="relaxed")  # fmt: skip
        dq_rows = _rows(b * sdqb + h * sdqh, offs_m, sdqm, ALIGN)
        tl.store(DQ + dq_rows[:, None] + offs_d[None, :] * sdqd, dq.to(DQ.dtype.element_ty),
                 mask=q_mask)  # fmt: skip
        tl.debug_barrier()  # the scratch blocks are rewritten by the next work item


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, Q, DO, q_off, do_off, LSE, DELTA, R, r_off, KEEP, slot, b, h, bh, start_m,
    start_n, cols, n_ok, L, shift,
    n_pos, sqm, sqd, sdom, sdod, srp, srd, smb, smh, smm, smn, offs_d, d_ok, offs_dv, dv_ok,
    qk_scale, sm_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    rows = tl.arange(0, BLOCK_M)
    offs_m = tl.multiple_of(start_m, BLOCK_M) + rows
    m_ok = offs_m < L
    if MASKED:
        q_mask = m_ok[:, None] & d_ok[None, :]
        do_mask = m_ok[:, None] & dv_ok[None, :]
    else:
        q_mask = d_ok[None, :]
        do_mask = dv_ok[None, :]
    q = tl.load(Q + _rows(q_off, offs_m, sqm, ALIGN)[:, None] + offs_d[None, :] * sqd, mask=q_mask,
                other=0.0)  # fmt: skip
    do = tl.load(DO + _rows(do_off, offs_m, sdom, ALIGN)[:, None] + offs_dv[None, :] * sdod,
                 mask=do_mask, other=0.0)  # fmt: skip
    lse = tl.load(LSE + bh * L + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * L + offs_m, mask=m_ok, other=0.0)
    # the tile's positional scores: band u = j - i + BLOCK_M - 1 (relative to the tile corners)
    # from position c0, written shifted to key order; both products cover every (a, j) once
    c0 = (L - 1) + (start_n - start_m) - (BLOCK_M - 1)
    u1 = tl.arange(0, BLOCK_M)
    u2 = tl.arange(0, BLOCK_N)
    band_lo = _band(R, r_off, c0, n_pos, srp, srd, offs_d, d_ok, BLOCK_M, ALIGN)
    band_up = _band(R, r_off, c0 + BLOCK_M, n_pos, srp, srd, offs_d, d_ok, BLOCK_N, ALIGN)
    j1 = u1[None, :] + rows[:, None] - (BLOCK_M - 1)
    j2 = u2[None, :] + rows[:, None] + 1
    tl.store(slot + rows[:, None] * BLOCK_N + j1, _dot(q, tl.trans(band_lo), IEEE).to(
        slot.dtype.element_ty), mask=(j1 >= 0) & (j1 < BLOCK_N))  # fmt: skip
    tl.store(slot + rows[:, None] * BLOCK_N + j2, _dot(q, tl.trans(band_up), IEEE).to(
        slot.dtype.element_ty), mask=j2 < BLOCK_N)  # fmt: skip
    tl.debug_barrier()
    # volatile: a precaution so that no software pipelining issues this load ahead of the barrier
    # (the slot is rewritten every second tile)
    pos = tl.load(slot + rows[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :], volatile=True)
    s = _dot(q, tl.trans(k), IEEE) * qk_scale + pos.to(tl.float32) * 1.4426950408889634
    p = tl.exp2(s - lse[:, None])
    if MASKED:
        keep = _keep(KEEP, b, h, offs_m, cols, m_ok, n_ok, shift, smb, smh, smm, smn, CAUSAL,
                     HAS_KEEP)  # fmt: skip
        p = tl.where(keep, p, 0.0)
    dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
    ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
    dk += _dot(tl.trans((ds * sm_scale).to(q.dtype)), q, IEEE)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, R, KEEP, DO, LSE, DELTA, DK, DV, SLOTS,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    srh, srp, srd,
    smb, smh, smm, smn,
    sdob, sdoh, sdom, sdod,
    H, L, S, n_work, qk_scale, sm_scale,
    D: tl.constexpr, D_V: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ALIGN: tl.constexpr,
):  # fmt: skip
    """``DK [B, H, S, D]``, ``DV [B, H, S, Dv]`` contiguous, in k's dtype; ``SLOTS`` two
    ``[BLOCK_M, BLOCK_N]`` scratch tiles per program."""
    pid = tl.program_id(0)
    cols_l = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    d_ok = offs_d < D
    dv_ok = offs_dv < D_V
    slots = SLOTS + pid.to(tl.int64) * 2 * BLOCK_M * BLOCK_N
    n_pos = L + S - 1
    shift = S - L
    n_n = tl.cdiv(S, BLOCK_N)
    for work in range(pid, n_work, tl.num_programs(0)):
        # causal: the leftmost key blocks are seen by the most queries, so they come first
        bh = (work // n_n).to(tl.int64)
        start_n = (work % n_n) * BLOCK_N
        b = bh // H
        h = bh % H
        cols = start_n + cols_l
        n_ok = cols < S
        cols64 = cols[:, None].to(tl.int64)
        k_rows = _rows(b * skb + h * skh, cols, skn, ALIGN)
        v_rows = _rows(b * svb + h * svh, cols, svn, ALIGN)
        k = tl.load(K + k_rows[:, None] + offs_d[None, :] * skd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
        v = tl.load(V + v_rows[:, None] + offs_dv[None, :] * svd,
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)  # fmt: skip
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        # query blocks [lo, L): the ones that see a key of this block; of those,
        # [whole_lo, whole_hi) see all of its keys and need no mask
        lo = 0
        whole_lo = 0
        if CAUSAL:
            lo = tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M
            whole_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M
        whole_hi = L // BLOCK_M * BLOCK_M
        if HAS_KEEP or start_n + BLOCK_N > S:
            whole_hi = lo
        whole_lo = tl.minimum(tl.maximum(whole_lo, lo), whole_hi)
        q_off = b * sqb + h * sqh
        do_off = b * sdob + h * sdoh
        for start_m in range(lo, whole_lo, BLOCK_M):
            slot = slots + (start_m // BLOCK_M % 2) * BLOCK_M * BLOCK_N
            dk, dv = _dkdv_tile(
                dk, dv, k, v, Q, DO, q_off, do_off, LSE, DELTA, R, h * srh, KEEP, slot, b, h, bh,
                start_m, start_n, cols, n_ok, L, shift, n_pos, sqm, sqd, sdom, sdod, srp, srd, smb,
                smh, smm, smn,
                offs_d, d_ok, offs_dv, dv_ok, qk_scale, sm_scale, True, CAUSAL, HAS_KEEP, IEEE,
                BLOCK_M, BLOCK_N, ALIGN,
            )  # fmt: skip
        for start_m in range(whole_lo, whole_hi, BLOCK_M):
            slot = slots + (start_m // BLOCK_M % 2) * BLOCK_M * BLOCK_N
            dk, dv = _dkdv_tile(
                dk, dv, k, v, Q, DO, q_off, do_off, LSE, DELTA, R, h * srh, KEEP, slot, b, h, bh,
                start_m, start_n, cols, n_ok, L, shift, n_pos, sqm, sqd, sdom, sdod, srp, srd, smb,
                smh, smm, smn,
                offs_d, d_ok, offs_dv, dv_ok, qk_scale, sm_scale, False, CAUSAL, HAS_KEEP, IEEE,
                BLOCK_M, BLOCK_N, ALIGN,
            )  # fmt: skip
        for start_m in range(tl.maximum(whole_hi, lo), L, BLOCK_M):
            slot = slots + (start_m // BLOCK_M % 2) * BLOCK_M * BLOCK_N
            dk, dv = _dkdv_tile(
                dk, dv, k, v, Q, DO, q_off, do_off, LSE, DELTA, R, h * srh, KEEP, slot, b, h, bh,
                start_m, start_n, cols, n_ok, L, shift, n_pos, sqm, sqd, sdom, sdod, srp, srd, smb,
                smh, smm, smn,
                offs_d, d_ok, offs_dv, dv_ok, qk_scale, sm_scale, True, CAUSAL, HAS_KEEP, IEEE,
                BLOCK_M, BLOCK_N, ALIGN,
            )  # fmt: skip
        tl.store(DK + (bh * S + cols64) * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
                 mask=n_ok[:, None] & d_ok[None, :])  # fmt: skip
        tl.store(DV + (bh * S + cols64) * D_V + offs_dv[None, :], dv.to(DV.dtype.element_ty),
                 mask=n_ok[:, None] & dv_ok[None, :])  # fmt: skip


# ----- launching -----

# (BLOCK_M, BLOCK_N, num_warps, num_stages, programs per SM) per kernel, by the bytes of one
# padded head row (the registers and shared memory a tile needs grow with it); the interpreter
# runs small blocks.
CONFIGS: dict[str, dict[int, tuple[int, int, int, int, int]]] = {
    "fwd": {
        128: (64, 64, 4, 3, 2),
        256: (128, 64, 8, 3, 1),
        512: (32, 32, 4, 2, 2),
        1024: (16, 16, 4, 1, 2),
    },
    "dq": {
        128: (64, 64, 4, 2, 2),
        256: (128, 64, 8, 3, 1),
        512: (32, 32, 4, 2, 2),
        1024: (16, 16, 4, 1, 2),
    },
    "dkdv": {
        128: (64, 64, 4, 2, 2),
        256: (64, 64, 4, 2, 2),
        512: (32, 32, 4, 2, 2),
        1024: (16, 16, 4, 1, 2),
    },
}
KERNELS = tuple(CONFIGS)


def _config(kernel: str, d_pad: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    if interpreting():
        return 16, 16, 1, 1, 2
    table = CONFIGS[kernel]
    row_bytes = d_pad * dtype.itemsize
    return table[min(b for b in table if b >= row_bytes)]


def _strides(t: torch.Tensor | None, n: int = 4) -> tuple[int, ...]:
    return (0,) * n if t is None else tuple(t.stride())


def _keep_args(keep: torch.Tensor | None, shape: tuple[int, int, int, int]):
    if keep is None:
        return None, (0, 0, 0, 0)
    keep = keep.expand(shape)
    return keep.view(torch.uint8) if keep.dtype == torch.bool else keep, keep.stride()


def _head_blocks(q: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int]:
    # At least 32 on the GPU: Triton 3.6 computed wrong bf16 products for a 16-wide value block.
    least = 16 if interpreting() else 32
    d_pad = max(least, next_power_of_2(q.shape[-1]))
    dv_pad = max(least, next_power_of_2(v.shape[-1]))
    return d_pad, dv_pad, max(d_pad, dv_pad)


def _grid(n_work: int, per_sm: int, device: torch.device) -> int:
    """Programs of a persistent grid (each owns its scratch)."""
    if device.type != "cuda":
        return max(1, min(n_work, 4))
    return max(1, min(n_work, per_sm * multiprocessors(device)))


def _launch_args(
    kernel: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor,
    keep: torch.Tensor | None,
    config: tuple[int, int, int, int, int] | None,
    *rows_like: torch.Tensor,
) -> tuple:
    """What every launch sets up alike: ``(config, keep, keep_strides, constexprs)`` with the
    ``config`` (default from ``CONFIGS``), ``keep`` as the kernels take it and the keyword
    arguments every kernel gets; ``rows_like``: the other ``[B, H, T, Dv]`` tensors the kernel
    addresses by row (``ALIGN`` holds for all of them)."""
    b, h, n_q = q.shape[:3]
    d_pad, dv_pad, both = _head_blocks(q, v)
    cfg = config or _config(kernel, both, q.dtype)
    # every row the kernels address: q, k, v (and the gradient and outputs, laid out alike or
    # contiguous) and r's rows
    align = min(row_alignment(q.shape[-1], q, k), row_alignment(v.shape[-1], v, *rows_like),
                row_alignment(q.shape[-1], r.unsqueeze(0)))  # fmt: skip
    block_m, block_n, warps, stages, _per_sm = cfg
    keep_t, keep_strides = _keep_args(keep, (b, h, n_q, k.shape[2]))
    constexprs = dict(
        D=q.shape[-1], D_V=v.shape[-1], HAS_KEEP=keep_t is not None, ALIGN=align,
        IEEE=q.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=d_pad,
        BLOCK_DV=dv_pad, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return cfg, keep_t, keep_strides, constexprs


def _query_plan(cfg, q: torch.Tensor, n_k: int) -> tuple[int, int, int]:
    """``(work items, programs, scratch width)`` of a kernel with one program per query block:
    the width holds every key of a row in key order, and every relative position a query block
    reaches (``S + BLOCK_M - 1``), in whole ``BLOCK_N`` chunks."""
    block_m, block_n, _w, _s, per_sm = cfg
    n_work = q.shape[0] * q.shape[1] * cdiv(q.shape[2], block_m)
    width = (cdiv(n_k + block_m, block_n) + 1) * block_n
    return n_work, _grid(n_work, per_sm, q.device), width


def relative_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor,
    keep: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    config: tuple[int, int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``(out [B, H, L, Dv] in q's dtype, lse [B, H, L] float32)``.

    Args:
        q: ``[B, H, L, D]``; k: ``[B, H, S, D]``; v: ``[B, H, S, Dv]``; r: ``[H, L + S - 1, D]``
            in q's dtype (any strides); keep: ``None`` or boolean, broadcastable to
            ``[B, H, L, S]`` (``True`` = attend).
        config: ``(BLOCK_M, BLOCK_N, num_warps, num_stages, programs per SM)``, default from
            ``CONFIGS["fwd"]``.
    """
    b, h, n_q, _d = q.shape
    n_k = k.shape[2]
    r = r.contiguous()  # a transposed r would cost a cache line per element of each band load
    out = torch.empty((b, h, n_q, v.shape[-1]), device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, n_q, device=q.device, dtype=torch.float32)
    if out.numel() == 0 or n_k == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    cfg, keep_t, keep_strides, constexprs = _launch_args("fwd", q, k, v, r, keep, config, out)
    n_work, programs, width = _query_plan(cfg, q, n_k)
    scratch = torch.empty(programs, cfg[0], width, device=q.device, dtype=q.dtype)
    _fwd_kernel[(programs,)](
        q, k, v, r, keep_t if keep_t is not None else lse, out, lse, scratch,
        *_strides(q), *_strides(k), *_strides(v), *_strides(r, 3), *keep_strides, *_strides(out),
        h, n_q, n_k, n_work, width, scale * LOG2E, CAUSAL=is_causal, **constexprs,
    )  # fmt: skip
    return out, lse


def relative_attention_bwd(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor,
    keep: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    is_causal: bool,
    scale: float,
    configs: dict[str, tuple[int, int, int, int, int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(dq, dk, dv, dr)`` with ``dr [H, P, D]`` float32, from ``grad [B, H, L, Dv]``
    and the forward's ``out`` and ``lse``; ``configs`` maps ``"dq"`` and ``"dkdv"`` to settings
    as :func:`relative_attention_fwd`'s (default from ``CONFIGS``)."""
    b, h, n_q, d = q.shape
    n_k, d_v = k.shape[2], v.shape[-1]
    configs = configs or {}
    r = r.contiguous()  # as in the forward
    dr = torch.zeros(h, n_q + n_k - 1 if n_q + n_k else 0, d, device=q.device, dtype=torch.float32)
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape), dr
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(b, h, n_k, d, device=q.device, dtype=k.dtype)
    dv = torch.empty(b, h, n_k, d_v, device=q.device, dtype=v.dtype)
    delta = (out.to(torch.float32) * grad.to(torch.float32)).sum(-1).contiguous()
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(r, 3))

    cfg, keep_t, keep_strides, constexprs = _launch_args(
        "dq", q, k, v, r, keep, configs.get("dq"), grad
    )
    keep_arg = keep_t if keep_t is not None else lse
    n_work, programs, width = _query_plan(cfg, q, n_k)
    pos = torch.empty(programs, cfg[0], width, device=q.device, dtype=q.dtype)
    ds = torch.empty_like(pos)
    _bwd_dq_kernel[(programs,)](
        q, k, v, r, keep_arg, grad, lse, delta, dq, dr, pos, ds,
        *strides, *keep_strides, *_strides(grad), *_strides(dq),
        h, n_q, n_k, n_work, width, scale * LOG2E, scale, CAUSAL=is_causal, **constexprs,
    )  # fmt: skip
    del pos, ds

    cfg, keep_t, keep_strides, constexprs = _launch_args(
        "dkdv", q, k, v, r, keep, configs.get("dkdv"), grad
    )
    block_m, block_n, _w, _s, per_sm = cfg
    n_work = b * h * cdiv(n_k, block_n)
    programs = _grid(n_work, per_sm, q.device)
    slots = torch.empty(programs, 2, block_m, block_n, device=q.device, dtype=q.dtype)
    _bwd_dkdv_kernel[(programs,)](
        q, k, v, r, keep_arg, grad, lse, delta, dk, dv, slots,
        *strides, *keep_strides, *_strides(grad),
        h, n_q, n_k, n_work, scale * LOG2E, scale, CAUSAL=is_causal, **constexprs,
    )  # fmt: skip
    return dq, dk, dv, dr


__all__ = ["relative_attention_bwd", "relative_attention_fwd"]
