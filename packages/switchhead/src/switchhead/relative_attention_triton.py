"""Flash-style Transformer-XL relative-position attention in Triton (forward and backward).

The score of query ``i`` and key ``j`` (natural-log units) is

    s_ij = scale * q_i . k_j + q_i . r[c(i, j)],   c(i, j) = j - i + L - 1,

with ``r [H, P, D]`` (``P = L + S - 1``) the projected relative-position embeddings, already
multiplied by the scale. A tile of ``B`` queries (from ``i0``) and ``B`` keys (from ``j0``)
touches the ``2B - 1`` consecutive positions from ``c0 = j0 - i0 - (B - 1) + L - 1``: the
kernels multiply the query tile by that band of ``r`` (a ``[B, 2B]`` product) and take entry
``(i, j)`` from band column ``j - i + B - 1`` with ``tl.gather`` (the relative shift, inside the
tile), so no ``[L, S]`` tensor is ever formed and memory stays linear in the length.

Backward: FlashAttention-2's, with the positional term recomputed the same way. The query-side
kernel also un-skews ``dS`` into band layout (a gather the other way) for the positional part of
``dq`` and for ``dr``. Consecutive key tiles of one query tile share half a band, so each program
adds every ``[B, D]`` block of ``dr`` once, atomically in float32 (blocks are shared by the
programs of all batches and query tiles: ``dr`` is not bitwise reproducible run to run).

Layouts: ``q [B, H, L, D]``, ``k [B, H, S, D]``, ``v [B, H, S, Dv]``, ``r [H, P, D]`` (any
strides), ``keep`` an optional ``uint8`` mask viewed as ``[B, H, L, S]`` (broadcast dimensions
with stride 0). Causal masking is bottom-right aligned: query ``i`` sees keys ``j <= i + S - L``.
A row that sees no key is 0. Head dims up to 256.

Needs ``tl.gather`` (Triton >= 3.2); :func:`kernels_available` says whether it is there. Float
literals in the kernels are fp32-representable and every pointer offset is int64.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # host side only; the kernels write their constants as literals


def kernels_available() -> bool:
    """Whether the installed Triton has what these kernels need (``tl.gather``)."""
    return hasattr(tl, "gather")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` in float32; exact float32 products (no TF32) for float32 inputs."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _band(r_base, c0, P, srp, srd, offs_d, d_ok, WIDTH: tl.constexpr):
    """Rows ``c0 .. c0 + WIDTH - 1`` of ``r`` as ``[WIDTH, BLOCK_D]`` (zero outside ``[0, P)``)."""
    c = c0 + tl.arange(0, WIDTH).to(tl.int64)
    ok = (c >= 0) & (c < P)
    mask = ok[:, None] & d_ok[None, :]
    return tl.load(r_base + c[:, None] * srp + offs_d[None, :] * srd, mask=mask, other=0.0)


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
            KEEP + b * smb + h * smh + rows[:, None] * smm + cols[None, :] * smn,
            mask=keep,
            other=0,
        )
        keep = keep & (given != 0)
    return keep


@triton.jit
def _fwd_kernel(
    Q, K, V, R, KEEP, OUT, LSE,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    srh, srp, srd,
    smb, smh, smm, smn,
    sob, soh, som, sod,
    H, L, S, qk_scale,
    D: tl.constexpr, D_V: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    start_m = tl.program_id(1) * BLOCK
    b = bh // H
    h = bh % H
    local = tl.arange(0, BLOCK)
    offs_m = start_m + local.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    m_ok = offs_m < L
    d_ok = offs_d < D
    dv_ok = offs_dv < D_V
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_DV], dtype=tl.float32)
    r_base = R + h * srh
    n_pos = L + S - 1
    shift = S - L
    skew = local[None, :] - local[:, None] + BLOCK - 1  # band column of (i, j)
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, start_m + BLOCK + shift)
    for start_n in range(0, hi, BLOCK):
        cols = start_n + local.to(tl.int64)
        n_ok = cols < S
        kt = tl.load(
            K + b * skb + h * skh + cols[None, :] * skn + offs_d[:, None] * skd,
            mask=n_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        band = _band(r_base, start_n - start_m - (BLOCK - 1) + L - 1, n_pos, srp, srd, offs_d,
                     d_ok, 2 * BLOCK)  # fmt: skip
        s = _dot(q, kt, IEEE) * qk_scale
        s += tl.gather(_dot(q, tl.trans(band), IEEE), skew, 1) * 1.4426950408889634
        keep = _keep(KEEP, b, h, offs_m, cols, m_ok, n_ok, shift, smb, smh, smm, smn, CAUSAL,
                     HAS_KEEP)  # fmt: skip
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            V + b * svb + h * svh + cols[:, None] * svn + offs_dv[None, :] * svd,
            mask=n_ok[:, None] & dv_ok[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural log; -inf for a row with no key
    tl.store(LSE + bh * L + offs_m, lse, mask=m_ok)
    tl.store(
        OUT + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
        out.to(OUT.dtype.element_ty),
        mask=m_ok[:, None] & dv_ok[None, :],
    )


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, R, KEEP, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    srh, srp, srd,
    smb, smh, smm, smn,
    sdob, sdoh, sdom, sdod,
    sdkb, sdkh, sdkn, sdkd,
    sdvb, sdvh, sdvn, sdvd,
    H, L, S, qk_scale, sm_scale,
    D: tl.constexpr, D_V: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """One program per (batch, head, block of keys), looping over the query blocks."""
    bh = tl.program_id(0).to(tl.int64)
    start_n = tl.program_id(1) * BLOCK
    b = bh // H
    h = bh % H
    local = tl.arange(0, BLOCK)
    offs_n = start_n + local.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    n_ok = offs_n < S
    d_ok = offs_d < D
    dv_ok = offs_dv < D_V
    k_mask = n_ok[:, None] & d_ok[None, :]
    v_mask = n_ok[:, None] & dv_ok[None, :]
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=k_mask,
                other=0.0)  # fmt: skip
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                mask=v_mask, other=0.0)  # fmt: skip
    dk = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_DV], dtype=tl.float32)
    r_base = R + h * srh
    n_pos = L + S - 1
    shift = S - L
    skew_t = local[:, None] - local[None, :] + BLOCK - 1  # [key j, query i]: band row of (i, j)
    lo = 0
    if CAUSAL:
        lo = tl.maximum(start_n - shift, 0)
        lo = (lo // BLOCK) * BLOCK
    for start_m in range(lo, L, BLOCK):
        rows = start_m + local.to(tl.int64)
        m_ok = rows < L
        q = tl.load(
            Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :] * sqd,
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        do = tl.load(
            DO + b * sdob + h * sdoh + rows[:, None] * sdom + offs_dv[None, :] * sdod,
            mask=m_ok[:, None] & dv_ok[None, :],
            other=0.0,
        )
        lse = tl.load(LSE + bh * L + rows, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + bh * L + rows, mask=m_ok, other=0.0)
        band = _band(r_base, start_n - start_m - (BLOCK - 1) + L - 1, n_pos, srp, srd, offs_d,
                     d_ok, 2 * BLOCK)  # fmt: skip
        st = _dot(k, tl.trans(q), IEEE) * qk_scale  # [keys, queries]
        st += tl.gather(_dot(band, tl.trans(q), IEEE), skew_t, 0) * 1.4426950408889634
        keep = _keep(KEEP, b, h, rows, offs_n, m_ok, n_ok, shift, smb, smh, smm, smn, CAUSAL,
                     HAS_KEEP)  # fmt: skip
        pt = tl.where(tl.trans(keep), tl.exp2(st - lse[None, :]), 0.0)
        dv += _dot(pt.to(do.dtype), do, IEEE)
        dpt = _dot(v, tl.trans(do), IEEE)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, IEEE)
    tl.store(DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             (dk * sm_scale).to(DK.dtype.element_ty), mask=k_mask)  # fmt: skip
    tl.store(DV + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=v_mask)  # fmt: skip


@triton.jit
def _add_dr(DR, h, c0, n_pos, D, block, offs_d, d_ok, BLOCK: tl.constexpr):
    """``dr[h, c0 : c0 + BLOCK] += block`` (float32 atomics, rows outside ``[0, P)`` dropped)."""
    c = c0 + tl.arange(0, BLOCK).to(tl.int64)
    ok = ((c >= 0) & (c < n_pos))[:, None] & d_ok[None, :]
    ptrs = DR + (h * n_pos + c[:, None]) * D + offs_d[None, :]
    tl.atomic_add(ptrs, block, mask=ok, sem="relaxed")


@triton.jit
def _bwd_dq_dr_kernel(
    Q, K, V, R, KEEP, DO, LSE, DELTA, DQ, DR,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    srh, srp, srd,
    smb, smh, smm, smn,
    sdob, sdoh, sdom, sdod,
    sdqb, sdqh, sdqm, sdqd,
    H, L, S, qk_scale, sm_scale,
    D: tl.constexpr, D_V: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """One program per (batch, head, block of queries), looping over the key blocks: ``dq`` and
    the program's share of ``dr`` (``DR``: float32 ``[H, P, D]``, contiguous)."""
    bh = tl.program_id(0).to(tl.int64)
    start_m = tl.program_id(1) * BLOCK
    b = bh // H
    h = bh % H
    local = tl.arange(0, BLOCK)
    offs_m = start_m + local.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    m_ok = offs_m < L
    d_ok = offs_d < D
    dv_ok = offs_dv < D_V
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=q_mask,
                other=0.0)  # fmt: skip
    do = tl.load(
        DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_dv[None, :] * sdod,
        mask=m_ok[:, None] & dv_ok[None, :],
        other=0.0,
    )
    lse = tl.load(LSE + bh * L + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * L + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    r_base = R + h * srh
    n_pos = L + S - 1
    shift = S - L
    # The band of key block t is [c0, c0 + 2B) with c0 = start_n - start_m - (B - 1) + L - 1: its
    # lower half (w < B) and upper half (w >= B). Query i, key j sit at band column
    # u = j - i + B - 1; band column w of the lower half holds key w + i - (B - 1), of the upper
    # half key w + i + 1 (when inside the block).
    u = local[None, :] - local[:, None] + BLOCK - 1
    u_lo = tl.minimum(u, BLOCK - 1)
    u_hi = tl.maximum(u - BLOCK, 0)
    j_lo = local[None, :] + local[:, None] - (BLOCK - 1)
    j_hi = local[None, :] + local[:, None] + 1
    c0 = -start_m - (BLOCK - 1) + L - 1
    lower = _band(r_base, c0, n_pos, srp, srd, offs_d, d_ok, BLOCK)
    carry = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)  # dr of the current lower half so far
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, start_m + BLOCK + shift)
    for start_n in range(0, hi, BLOCK):
        cols = start_n + local.to(tl.int64)
        n_ok = cols < S
        c0 = start_n - start_m - (BLOCK - 1) + L - 1
        upper = _band(r_base, c0 + BLOCK, n_pos, srp, srd, offs_d, d_ok, BLOCK)
        kt = tl.load(
            K + b * skb + h * skh + cols[None, :] * skn + offs_d[:, None] * skd,
            mask=n_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        vt = tl.load(
            V + b * svb + h * svh + cols[None, :] * svn + offs_dv[:, None] * svd,
            mask=n_ok[None, :] & dv_ok[:, None],
            other=0.0,
        )
        pos_lo = tl.gather(_dot(q, tl.trans(lower), IEEE), u_lo, 1)
        pos_hi = tl.gather(_dot(q, tl.trans(upper), IEEE), u_hi, 1)
        s = _dot(q, kt, IEEE) * qk_scale
        s += tl.where(u < BLOCK, pos_lo, pos_hi) * 1.4426950408889634
        keep = _keep(KEEP, b, h, offs_m, cols, m_ok, n_ok, shift, smb, smh, smm, smn, CAUSAL,
                     HAS_KEEP)  # fmt: skip
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        ds = p * (_dot(do, vt, IEEE) - delta[:, None])
        dq += _dot((ds * sm_scale).to(kt.dtype), tl.trans(kt), IEEE)
        # dS in band layout, each half [queries, band columns]
        ds_lo = tl.where(j_lo >= 0, tl.gather(ds, tl.maximum(j_lo, 0), 1), 0.0).to(q.dtype)
        ds_hi = tl.where(j_hi < BLOCK, tl.gather(ds, tl.minimum(j_hi, BLOCK - 1), 1), 0.0)
        ds_hi = ds_hi.to(q.dtype)
        dq += _dot(ds_lo, lower, IEEE) + _dot(ds_hi, upper, IEEE)
        # The lower half is complete now (earlier key blocks gave their upper halves to it).
        _add_dr(DR, h, c0, n_pos, D, carry + _dot(tl.trans(ds_lo), q, IEEE), offs_d, d_ok, BLOCK)
        carry = _dot(tl.trans(ds_hi), q, IEEE)
        lower = upper
    if hi > 0:
        last = (hi - 1) // BLOCK * BLOCK
        _add_dr(DR, h, last - start_m + L, n_pos, D, carry, offs_d, d_ok, BLOCK)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=q_mask)  # fmt: skip


# ----- launching -----

# (BLOCK, num_warps, num_stages) per kernel, by the bytes of one padded head row (the shared
# memory a stage needs grows with it); the interpreter runs small blocks.
CONFIGS: dict[str, dict[int, tuple[int, int, int]]] = {
    "fwd": {128: (64, 4, 3), 256: (64, 4, 2), 512: (32, 4, 2), 1024: (16, 4, 1)},
    "dkdv": {128: (64, 4, 2), 256: (64, 8, 2), 512: (32, 4, 2), 1024: (16, 4, 1)},
    "dq": {128: (64, 4, 2), 256: (64, 8, 2), 512: (32, 4, 2), 1024: (16, 4, 1)},
}


def _config(kernel: str, d_pad: int, dtype: torch.dtype) -> tuple[int, int, int]:
    if _interpreting():
        return 16, 1, 1
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
    least = 16 if _interpreting() else 32
    d_pad = max(least, triton.next_power_of_2(q.shape[-1]))
    dv_pad = max(least, triton.next_power_of_2(v.shape[-1]))
    return d_pad, dv_pad, max(d_pad, dv_pad)


def relative_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor,
    keep: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    config: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``(out [B, H, L, Dv] in q's dtype, lse [B, H, L] float32)``.

    Args:
        q: ``[B, H, L, D]``; k: ``[B, H, S, D]``; v: ``[B, H, S, Dv]``; r: ``[H, L + S - 1, D]``
            in q's dtype (any strides); keep: ``None`` or boolean, broadcastable to
            ``[B, H, L, S]`` (``True`` = attend).
        config: ``(BLOCK, num_warps, num_stages)``, default from ``CONFIGS``.
    """
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    out = torch.empty((b, h, n_q, v.shape[-1]), device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, n_q, device=q.device, dtype=torch.float32)
    if out.numel() == 0 or n_k == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    d_pad, dv_pad, both = _head_blocks(q, v)
    block, warps, stages = config or _config("fwd", both, q.dtype)
    keep_t, keep_strides = _keep_args(keep, (b, h, n_q, n_k))
    _fwd_kernel[(b * h, triton.cdiv(n_q, block))](
        q, k, v, r, keep_t if keep_t is not None else lse, out, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(r, 3), *keep_strides, *_strides(out),
        h, n_q, n_k, scale * LOG2E, d, v.shape[-1],
        CAUSAL=is_causal, HAS_KEEP=keep_t is not None, IEEE=q.dtype == torch.float32,
        BLOCK=block, BLOCK_D=d_pad, BLOCK_DV=dv_pad, num_warps=warps, num_stages=stages,
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
    dkdv_config: tuple[int, int, int] | None = None,
    dq_config: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(dq, dk, dv, dr)`` with ``dr [H, P, D]`` float32, from ``grad [B, H, L, Dv]``
    and the forward's ``out`` and ``lse``; configs as :func:`relative_attention_fwd`'s."""
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    dr = torch.zeros(h, n_q + n_k - 1 if n_q + n_k else 0, d, device=q.device, dtype=torch.float32)
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dr
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    delta = (out.to(torch.float32) * grad.to(torch.float32)).sum(-1).contiguous()
    d_pad, dv_pad, both = _head_blocks(q, v)
    keep_t, keep_strides = _keep_args(keep, (b, h, n_q, n_k))
    common = dict(CAUSAL=is_causal, HAS_KEEP=keep_t is not None, IEEE=q.dtype == torch.float32,
                  BLOCK_D=d_pad, BLOCK_DV=dv_pad)  # fmt: skip
    keep_arg = keep_t if keep_t is not None else lse
    block, warps, stages = dkdv_config or _config("dkdv", both, q.dtype)
    _bwd_dkdv_kernel[(b * h, triton.cdiv(n_k, block))](
        q, k, v, r, keep_arg, grad, lse, delta, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(r, 3), *keep_strides,
        *_strides(grad), *_strides(dk), *_strides(dv),
        h, n_q, n_k, scale * LOG2E, scale, d, v.shape[-1],
        BLOCK=block, num_warps=warps, num_stages=stages, **common,
    )  # fmt: skip
    block, warps, stages = dq_config or _config("dq", both, q.dtype)
    _bwd_dq_dr_kernel[(b * h, triton.cdiv(n_q, block))](
        q, k, v, r, keep_arg, grad, lse, delta, dq, dr,
        *_strides(q), *_strides(k), *_strides(v), *_strides(r, 3), *keep_strides,
        *_strides(grad), *_strides(dq),
        h, n_q, n_k, scale * LOG2E, scale, d, v.shape[-1],
        BLOCK=block, num_warps=warps, num_stages=stages, **common,
    )  # fmt: skip
    return dq, dk, dv, dr


__all__ = ["kernels_available", "relative_attention_bwd", "relative_attention_fwd"]
