"""Flash-style Transformer-XL relative-position attention in Triton (forward and backward).

The score of query ``i`` and key ``j`` (natural-log units) is

    s_ij = scale * q_i . k_j + q_i . r[c(i, j)],   c(i, j) = j - i + L - 1,

with ``r [H, P, D]`` (``P = L + S - 1``) the projected relative-position embeddings, already
multiplied by the scale. The relative shift (entry ``(i, j)`` of the positional scores sits at
column ``j - i`` of the plain product ``q r^T``) is what a register tile cannot do cheaply, and
global memory does for free: each program first writes the positional scores of its block of
``B`` queries, ``q_blk @ r[c_lo : c_lo + n]^T`` for every position its keys reach, to a scratch
row block of its own (``[B, width]``, in the inputs' dtype, L2-resident), then reads them back
shifted (row ``i``, column ``j - i + B - 1``) inside the usual FlashAttention loop over key
blocks. No ``[L, S]`` tensor is formed: the scratch is one ``[B, width]`` block per program of a
persistent grid (a few programs per SM), so memory stays linear in the length. (A shift with
``tl.gather`` inside the register tile made the forward 1.5x slower on an H100: 4.7 against
3.1 ms at T=4096: benchmarks/results/sweep_relative_attention.md, the 4.7 as of commit 44ecf1c.)

Backward, one program per block of queries (persistent, heaviest blocks first): the positional
scores staged as in the forward; the loop over key blocks accumulates ``dq`` and adds the
program's ``dk``, ``dv`` blocks to float32 buffers atomically, and writes ``dS`` shifted into a
second scratch, which then holds ``dS`` by relative position (row ``i``, column
``c - c_lo``); a last pass over that block gives the positional part of ``dq`` and ``dr``
(atomically). Gradients of ``k``, ``v`` and ``r`` are therefore not bitwise reproducible run to
run.

Layouts: ``q [B, H, L, D]``, ``k [B, H, S, D]``, ``v [B, H, S, Dv]``, ``r [H, P, D]`` (any
strides), ``keep`` an optional ``uint8`` mask viewed as ``[B, H, L, S]`` (broadcast dimensions
with stride 0). Causal masking is bottom-right aligned: query ``i`` sees keys ``j <= i + S - L``.
A row that sees no key is 0. Head dims up to 256. Float literals in the kernels are
fp32-representable and every pointer offset is int64.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # host side only; the kernels write their constants as literals


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
def _stage_positions(
    q, r_base, scratch, c_lo, n_cols, n_pos, width, srp, srd, offs_d, d_ok,
    IEEE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``scratch[i, u] = q_i . r[c_lo + u]`` for ``u < n_cols`` (rounded up to ``2 * BLOCK``)."""
    rows = tl.arange(0, BLOCK).to(tl.int64)
    w = tl.arange(0, 2 * BLOCK).to(tl.int64)
    for u0 in range(0, n_cols, 2 * BLOCK):
        band = _band(r_base, c_lo + u0, n_pos, srp, srd, offs_d, d_ok, 2 * BLOCK)
        scores = _dot(q, tl.trans(band), IEEE)
        tl.store(scratch + rows[:, None] * width + u0 + w[None, :],
                 scores.to(scratch.dtype.element_ty))  # fmt: skip


@triton.jit
def _block_of(work, n_m, H, L, S, CAUSAL: tl.constexpr, BLOCK: tl.constexpr):
    """Work item -> ``(b, h, bh, start_m, hi)``: the heaviest query blocks come first; ``hi`` is
    the end of the keys the block sees."""
    bh = (work // n_m).to(tl.int64)
    start_m = (n_m - 1 - work % n_m) * BLOCK
    hi = S
    if CAUSAL:
        hi = tl.maximum(tl.minimum(S, start_m + BLOCK + S - L), 0)
    return bh // H, bh % H, bh, start_m, hi


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
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    local = tl.arange(0, BLOCK).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    d_ok = offs_d < D
    dv_ok = offs_dv < D_V
    scratch = SCRATCH + pid.to(tl.int64) * BLOCK * width
    n_pos = L + S - 1
    shift = S - L
    n_m = tl.cdiv(L, BLOCK)
    for work in range(pid, n_work, tl.num_programs(0)):
        b, h, bh, start_m, hi = _block_of(work, n_m, H, L, S, CAUSAL, BLOCK)
        offs_m = start_m + local
        m_ok = offs_m < L
        q = tl.load(
            Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        # scratch column u of row i: position c_lo + u = j - i + L - 1, i.e. u = j - i_local + B - 1
        c_lo = L - start_m - BLOCK
        _stage_positions(q, R + h * srh, scratch, c_lo, hi + BLOCK - 1, n_pos, width, srp, srd,
                         offs_d, d_ok, IEEE, BLOCK)  # fmt: skip
        tl.debug_barrier()
        m_i = tl.full([BLOCK], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK], dtype=tl.float32)
        acc = tl.zeros([BLOCK, BLOCK_DV], dtype=tl.float32)
        for start_n in range(0, hi, BLOCK):
            cols = start_n + local
            n_ok = cols < S
            kt = tl.load(
                K + b * skb + h * skh + cols[None, :] * skn + offs_d[:, None] * skd,
                mask=n_ok[None, :] & d_ok[:, None],
                other=0.0,
            )
            keep = _keep(KEEP, b, h, offs_m, cols, m_ok, n_ok, shift, smb, smh, smm, smn, CAUSAL,
                         HAS_KEEP)  # fmt: skip
            pos = tl.load(scratch + local[:, None] * width + cols[None, :] - local[:, None]
                          + BLOCK - 1, mask=keep, other=0.0)  # fmt: skip
            s = _dot(q, kt, IEEE) * qk_scale + pos.to(tl.float32) * 1.4426950408889634
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
        tl.debug_barrier()  # the scratch is rewritten by the next work item


@triton.jit
def _bwd_kernel(
    Q, K, V, R, KEEP, DO, LSE, DELTA, DQ, DK, DV, DR, POS, DS,
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
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """``DQ`` in q's dtype; ``DK [B, H, S, D]``, ``DV [B, H, S, Dv]``, ``DR [H, P, D]`` float32,
    contiguous and zeroed (added to atomically); ``POS``, ``DS`` scratch blocks."""
    pid = tl.program_id(0)
    local = tl.arange(0, BLOCK).to(tl.int64)
    w2 = tl.arange(0, 2 * BLOCK).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    d_ok = offs_d < D
    dv_ok = offs_dv < D_V
    pos_s = POS + pid.to(tl.int64) * BLOCK * width
    ds_s = DS + pid.to(tl.int64) * BLOCK * width
    n_pos = L + S - 1
    shift = S - L
    n_m = tl.cdiv(L, BLOCK)
    for work in range(pid, n_work, tl.num_programs(0)):
        b, h, bh, start_m, hi = _block_of(work, n_m, H, L, S, CAUSAL, BLOCK)
        offs_m = start_m + local
        m_ok = offs_m < L
        q_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=q_mask, other=0.0)  # fmt: skip
        do = tl.load(
            DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_dv[None, :] * sdod,
            mask=m_ok[:, None] & dv_ok[None, :],
            other=0.0,
        )
        lse = tl.load(LSE + bh * L + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + bh * L + offs_m, mask=m_ok, other=0.0)
        c_lo = L - start_m - BLOCK
        r_base = R + h * srh
        _stage_positions(q, r_base, pos_s, c_lo, hi + BLOCK - 1, n_pos, width, srp, srd, offs_d,
                         d_ok, IEEE, BLOCK)  # fmt: skip
        tl.debug_barrier()
        dq = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, hi, BLOCK):
            cols = start_n + local
            n_ok = cols < S
            k = tl.load(K + b * skb + h * skh + cols[:, None] * skn + offs_d[None, :] * skd,
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
            v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + offs_dv[None, :] * svd,
                        mask=n_ok[:, None] & dv_ok[None, :], other=0.0)  # fmt: skip
            keep = _keep(KEEP, b, h, offs_m, cols, m_ok, n_ok, shift, smb, smh, smm, smn, CAUSAL,
                         HAS_KEEP)  # fmt: skip
            shifted = local[:, None] * width + cols[None, :] - local[:, None] + BLOCK - 1
            pos = tl.load(pos_s + shifted, mask=keep, other=0.0)
            s = _dot(q, tl.trans(k), IEEE) * qk_scale + pos.to(tl.float32) * 1.4426950408889634
            p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
            ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
            ds_scaled = (ds * sm_scale).to(q.dtype)
            dq += _dot(ds_scaled, k, IEEE)
            # this key block's share of dk and dv (one atomic add per element)
            kv_rows = (bh * S + cols)[:, None]
            tl.atomic_add(DK + kv_rows * D + offs_d[None, :], _dot(tl.trans(ds_scaled), q, IEEE),
                          mask=n_ok[:, None] & d_ok[None, :], sem="relaxed")  # fmt: skip
            tl.atomic_add(DV + kv_rows * D_V + offs_dv[None, :],
                          _dot(tl.trans(p.to(do.dtype)), do, IEEE),
                          mask=n_ok[:, None] & dv_ok[None, :], sem="relaxed")  # fmt: skip
            tl.store(
                ds_s + shifted, ds.to(ds_s.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :]
            )
        tl.debug_barrier()
        # dS by relative position: column u of row i is key j = u + i_local - (B - 1)
        for u0 in range(0, hi + BLOCK - 1, 2 * BLOCK):
            key = u0 + w2[None, :] + local[:, None] - (BLOCK - 1)
            valid = m_ok[:, None] & (key >= 0) & (key < hi)
            ds_rel = tl.load(ds_s + local[:, None] * width + u0 + w2[None, :], mask=valid,
                             other=0.0)  # fmt: skip
            band = _band(r_base, c_lo + u0, n_pos, srp, srd, offs_d, d_ok, 2 * BLOCK)
            dq += _dot(ds_rel, band, IEEE)
            c = c_lo + u0 + w2
            dr_ok = ((c >= 0) & (c < n_pos))[:, None] & d_ok[None, :]
            tl.atomic_add(DR + (h * n_pos + c[:, None]) * D + offs_d[None, :],
                          _dot(tl.trans(ds_rel), q, IEEE), mask=dr_ok, sem="relaxed")  # fmt: skip
        tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
                 dq.to(DQ.dtype.element_ty), mask=q_mask)  # fmt: skip
        tl.debug_barrier()  # the scratch blocks are rewritten by the next work item


# ----- launching -----

# (BLOCK, num_warps, num_stages, programs per SM) per kernel, by the bytes of one padded head row
# (the shared memory a stage needs grows with it); the interpreter runs small blocks.
CONFIGS: dict[str, dict[int, tuple[int, int, int, int]]] = {
    "fwd": {128: (64, 4, 3, 2), 256: (64, 4, 2, 2), 512: (32, 4, 2, 2), 1024: (16, 4, 1, 2)},
    "bwd": {128: (64, 4, 2, 2), 256: (32, 4, 2, 4), 512: (32, 4, 2, 2), 1024: (16, 4, 1, 2)},
}


def _config(kernel: str, d_pad: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    if _interpreting():
        return 16, 1, 1, 2
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


def _grid(n_work: int, per_sm: int, device: torch.device) -> int:
    """Programs of the persistent grid (each owns one scratch block)."""
    if device.type != "cuda":
        return max(1, min(n_work, 4))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_work, per_sm * sms))


def _scratch(programs: int, block: int, n_k: int, dtype: torch.dtype, device) -> torch.Tensor:
    """One ``[block, width]`` block per program; ``width`` covers every position a query block
    reaches (``S + B - 1``) rounded up to whole ``2B`` chunks."""
    width = (triton.cdiv(n_k + block, 2 * block) + 1) * 2 * block
    return torch.empty(programs, block, width, device=device, dtype=dtype)


def _plan(
    kernel: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor | None,
    config: tuple[int, int, int, int] | None,
) -> tuple:
    """What the forward and the backward (``kernel``) set up alike before their launch:
    ``(d_pad, dv_pad, block, warps, stages, keep, keep_strides, n_work, programs, scratch)``,
    with ``config`` (default from ``CONFIGS``), ``keep`` as the kernels take it, the work items
    of the persistent grid, its programs and one scratch block per program."""
    b, h, n_q = q.shape[:3]
    n_k = k.shape[2]
    d_pad, dv_pad, both = _head_blocks(q, v)
    block, warps, stages, per_sm = config or _config(kernel, both, q.dtype)
    keep_t, keep_strides = _keep_args(keep, (b, h, n_q, n_k))
    n_work = b * h * triton.cdiv(n_q, block)
    programs = _grid(n_work, per_sm, q.device)
    scratch = _scratch(programs, block, n_k, q.dtype, q.device)
    return d_pad, dv_pad, block, warps, stages, keep_t, keep_strides, n_work, programs, scratch


def relative_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor,
    keep: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    config: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``(out [B, H, L, Dv] in q's dtype, lse [B, H, L] float32)``.

    Args:
        q: ``[B, H, L, D]``; k: ``[B, H, S, D]``; v: ``[B, H, S, Dv]``; r: ``[H, L + S - 1, D]``
            in q's dtype (any strides); keep: ``None`` or boolean, broadcastable to
            ``[B, H, L, S]`` (``True`` = attend).
        config: ``(BLOCK, num_warps, num_stages, programs per SM)``, default from ``CONFIGS``.
    """
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    out = torch.empty((b, h, n_q, v.shape[-1]), device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, n_q, device=q.device, dtype=torch.float32)
    if out.numel() == 0 or n_k == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    d_pad, dv_pad, block, warps, stages, keep_t, keep_strides, n_work, programs, scratch = _plan(
        "fwd", q, k, v, keep, config
    )
    _fwd_kernel[(programs,)](
        q, k, v, r, keep_t if keep_t is not None else lse, out, lse, scratch,
        *_strides(q), *_strides(k), *_strides(v), *_strides(r, 3), *keep_strides, *_strides(out),
        h, n_q, n_k, n_work, scratch.shape[-1], scale * LOG2E, d, v.shape[-1],
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
    config: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(dq, dk, dv, dr)`` with ``dr [H, P, D]`` float32, from ``grad [B, H, L, Dv]``
    and the forward's ``out`` and ``lse``; ``config`` as :func:`relative_attention_fwd`'s."""
    b, h, n_q, d = q.shape
    n_k, d_v = k.shape[2], v.shape[-1]
    dr = torch.zeros(h, n_q + n_k - 1 if n_q + n_k else 0, d, device=q.device, dtype=torch.float32)
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape), dr
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.zeros(b, h, n_k, d, device=q.device, dtype=torch.float32)
    dv = torch.zeros(b, h, n_k, d_v, device=q.device, dtype=torch.float32)
    delta = (out.to(torch.float32) * grad.to(torch.float32)).sum(-1).contiguous()
    d_pad, dv_pad, block, warps, stages, keep_t, keep_strides, n_work, programs, pos = _plan(
        "bwd", q, k, v, keep, config
    )
    ds = torch.empty_like(pos)
    _bwd_kernel[(programs,)](
        q, k, v, r, keep_t if keep_t is not None else lse, grad, lse, delta, dq, dk, dv, dr,
        pos, ds,
        *_strides(q), *_strides(k), *_strides(v), *_strides(r, 3), *keep_strides,
        *_strides(grad), *_strides(dq),
        h, n_q, n_k, n_work, pos.shape[-1], scale * LOG2E, scale, d, d_v,
        CAUSAL=is_causal, HAS_KEEP=keep_t is not None, IEEE=q.dtype == torch.float32,
        BLOCK=block, BLOCK_D=d_pad, BLOCK_DV=dv_pad, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return dq, dk.to(k.dtype), dv.to(v.dtype), dr


__all__ = ["relative_attention_bwd", "relative_attention_fwd"]
