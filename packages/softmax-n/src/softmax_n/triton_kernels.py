"""Fused flash-attention kernels for softmax_n in Triton (forward and backward).

The extra logit ``log n`` enters the online softmax as its starting state: the running maximum
starts at ``log n`` and the running sum at ``exp(log n - max) = 1`` (0 when ``n = 0``). The
forward stores ``lse_n = logaddexp(lse, log n)`` per row; the backward is FlashAttention-2's with
``lse_n`` (the softmax_n Jacobian has the softmax form, see ``fused.py``). Attention sinks give
the kernel the extra logit itself instead of ``n`` (``SINK``): the running maximum starts at the
sink logit, so ``exp(sink)`` is never formed.

Layouts: ``q [B, H, L, D]``, ``k [B, Hkv, S, D]``, ``v [B, Hkv, S, Dv]`` with ``H % Hkv == 0``
(any strides, a head stride of 0 shares one key/value between heads), ``n [B, H, L]`` float32
(or the sink logits, ``[B, H, L]`` float32).
Causal masking is aligned bottom-right: query ``i`` sees keys ``j <= i + S - L``. A row that sees
no key is 0 for every ``n`` (as ``F.scaled_dot_product_attention``). Head dims ``D`` and ``Dv``
up to 256 (each padded to a power of two inside), any lengths.

Triton pitfalls kept in mind here: every float literal is fp32-representable (a literal such as
``1e-38`` is typed fp64 by some Triton versions and changes the type of loop-carried values; the
interpreter does not notice), constants are literals inside the kernels (no non-constexpr
globals), and every pointer offset is computed in int64.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # host side only; the kernels write their constants as literals


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# triton.cdiv and triton.next_power_of_2 are constexpr functions from Triton 3.5 on: ~3 us per
# host call, several per launch; the launchers use these plain versions.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` in float32; exact float32 products (no TF32) for float32 inputs."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _fwd_kernel(
    Q, K, V, NN, OUT, LSE,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    H, GROUP, L, S, D, D_V, qk_scale,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr, SINK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
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
    n = tl.load(NN + bh * L + offs_m, mask=m_ok, other=0.0).to(tl.float32)
    if SINK:  # noqa: SIM108 (NN holds the extra logit itself, natural log: to base 2)
        log_n = n * 1.4426950408889634
    else:
        log_n = tl.log2(n)  # -inf for n = 0
    # running max and sum start with the extra logit log n (max -1e30 when n = 0, sum 0)
    m_i = tl.maximum(log_n, -1.0e30)
    l_i = tl.exp2(log_n - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    shift = S - L
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M + shift)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < S
        k = tl.load(
            k_base + cols[None, :] * skn + offs_d[:, None] * skd,
            mask=n_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        s = _dot(q, k, IEEE)
        s = s * qk_scale
        keep = n_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + shift)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + cols[:, None] * svn + offs_dv[None, :] * svd,
            mask=n_ok[:, None] & dv_ok[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    # l_i = 0 only for n = 0 and a row that sees no key: its output is 0 (as SDPA), not 0/0
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # log2 -> natural log (-inf for l_i = 0)
    tl.store(LSE + bh * L + offs_m, lse, mask=m_ok)
    tl.store(
        OUT + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
        out.to(OUT.dtype.element_ty),
        mask=m_ok[:, None] & dv_ok[None, :],
    )


@triton.jit
def _delta_kernel(
    OUT, DO, DELTA, L, D,
    sob, soh, som, sod, sdb, sdh, sdm, sdd, H,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask = (offs_m < L)[:, None] & (offs_d < D)[None, :]
    o = tl.load(
        OUT + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
        mask=mask,
        other=0.0,
    )
    do = tl.load(
        DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=mask, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * L + offs_m, delta, mask=offs_m < L)


@triton.jit
def _gate_rows_kernel(
    OUT, LSE, LSE_N, C, L, D, c_value,
    sob, soh, som, sod, slb, slh, slm, H,
    C_PER_HEAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``out *= sigmoid(lse - c)`` in place and ``lse_n = logaddexp(lse, c)``, ``c`` the extra
    logit (``C[h]`` or ``c_value``; ``-inf``: no extra logit, gate 1)."""
    bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    rows = offs_m < L
    row_off = b * slb + h * slh + offs_m * slm
    lse = tl.load(LSE + row_off, mask=rows, other=0.0).to(tl.float32)
    c = tl.load(C + h).to(tl.float32) if C_PER_HEAD else c_value
    no_extra = c == float("-inf")
    diff = tl.where(no_extra, float("inf"), lse - c)
    gate = tl.sigmoid(diff)
    # logaddexp without overflow; exact where either side is -inf
    lse_n = tl.maximum(lse, c) + tl.log(1.0 + tl.exp(-tl.abs(diff)))
    lse_n = tl.where(no_extra, lse, lse_n)
    tl.store(LSE_N + row_off, lse_n, mask=rows)
    mask = rows[:, None] & (offs_d < D)[None, :]
    ptrs = OUT + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod
    o = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (o * gate[:, None]).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _extra_logit_grad_kernel(
    OUT, DO, LSE_N, C, PART, L, D,
    sob, soh, som, sod, sdb, sdh, sdm, sdd, slb, slh, slm, H,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``PART[bh, block] = -sum_rows rowsum(out * dout) * exp(C[h] - lse_n)`` over one block of
    rows (``exp(C[h] - lse_n) = sigmoid(C[h] - lse) <= 1``; 0 where ``C[h] = -inf``)."""
    bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    rows = offs_m < L
    mask = rows[:, None] & (offs_d < D)[None, :]
    o = tl.load(
        OUT + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
        mask=mask,
        other=0.0,
    )
    do = tl.load(
        DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=mask, other=0.0
    )
    row = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse_n = tl.load(LSE_N + b * slb + h * slh + offs_m * slm, mask=rows, other=0.0)
    c = tl.load(C + h).to(tl.float32)
    w = tl.where(rows, tl.exp(c - lse_n.to(tl.float32)), 0.0)
    w = tl.where(c == float("-inf"), 0.0, w)
    tl.store(PART + bh * tl.num_programs(1) + pid_m, -tl.sum(row * w, 0))


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod,
    sdkb, sdkh, sdkn, sdkd,
    sdvb, sdvh, sdvn, sdvd,
    H, HK, GROUP, L, S, D, D_V, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """One program per (batch, key/value head, block of keys); loops over the group's query
    heads and query blocks, so grouped-query gradients need no atomics."""
    bhk = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    b = bhk // HK
    hk = bhk % HK
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    n_ok = offs_n < S
    d_ok = offs_d < D
    dv_ok = offs_dv < D_V
    kv_mask = n_ok[:, None] & d_ok[None, :]
    v_mask = n_ok[:, None] & dv_ok[None, :]
    k = tl.load(
        K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V + b * svb + hk * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
        mask=v_mask,
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    shift = S - L
    lo = 0
    if CAUSAL:
        lo = tl.maximum(pid_n * BLOCK_N - shift, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        for start_m in range(lo, L, BLOCK_M):
            rows = start_m + offs_m
            m_ok = rows < L
            q = tl.load(
                q_base + rows[:, None] * sqm + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            do = tl.load(
                do_base + rows[:, None] * sdom + offs_dv[None, :] * sdod,
                mask=m_ok[:, None] & dv_ok[None, :],
                other=0.0,
            )
            lse = tl.load(LSE + bh * L + rows, mask=m_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + bh * L + rows, mask=m_ok, other=0.0)
            # scores transposed: [BLOCK_N, BLOCK_M]
            st = _dot(k, tl.trans(q), IEEE)
            st = st * qk_scale
            keep = n_ok[:, None] & m_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_n[:, None] <= rows[None, :] + shift)
            pt = tl.where(keep, tl.exp2(st - lse[None, :]), 0.0)
            dv += _dot(pt.to(do.dtype), do, IEEE)
            dpt = _dot(v, tl.trans(do), IEEE)
            dst = pt * (dpt - delta[None, :])
            dk += _dot(dst.to(q.dtype), q, IEEE)
    dk = dk * sm_scale
    tl.store(
        DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
        dk.to(DK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd,
        dv.to(DV.dtype.element_ty),
        mask=v_mask,
    )


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod,
    sdqb, sdqh, sdqm, sdqd,
    H, GROUP, L, S, D, D_V, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    m_ok = offs_m < L
    d_ok = offs_d < D
    dv_ok = offs_dv < D_V
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
        mask=q_mask,
        other=0.0,
    )
    do = tl.load(
        DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_dv[None, :] * sdod,
        mask=m_ok[:, None] & dv_ok[None, :],
        other=0.0,
    )
    lse = tl.load(LSE + bh * L + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * L + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    shift = S - L
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M + shift)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < S
        kt = tl.load(
            k_base + cols[None, :] * skn + offs_d[:, None] * skd,
            mask=n_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        vt = tl.load(
            v_base + cols[None, :] * svn + offs_dv[:, None] * svd,
            mask=n_ok[None, :] & dv_ok[:, None],
            other=0.0,
        )
        s = _dot(q, kt, IEEE)
        dp = _dot(do, vt, IEEE)
        s = s * qk_scale
        keep = m_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + shift)
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), IEEE)
    dq = dq * sm_scale
    tl.store(
        DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
        dq.to(DQ.dtype.element_ty),
        mask=q_mask,
    )


def _blocks(d_pad: int, backward: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a padded head dim."""
    if _interpreting():
        return 16, 16, 1, 1
    if backward:
        if d_pad <= 64:
            return 64, 64, 4, 3
        if d_pad <= 128:
            return 64, 64, 8, 2
        return 32, 32, 4, 1
    if d_pad <= 64:
        return 128, 64, 4, 3
    if d_pad <= 128:
        return 128, 64, 8, 3
    return 64, 32, 4, 2


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n: torch.Tensor,
    is_causal: bool,
    scale: float,
    sink: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass.

    Args:
        q: ``[B, H, L, D]``; k: ``[B, Hkv, S, D]``, v: ``[B, Hkv, S, Dv]`` with ``H % Hkv == 0``
            (any strides); ``D, Dv >= 1``.
        n: ``[B, H, L]`` float32, contiguous, finite, ``>= 0``; with ``sink``, the extra logit
            itself (``log n``: the sink logits, no NaN or ``+inf``).

    Returns:
        ``(out [B, H, L, Dv] in q's dtype, lse_n [B, H, L] float32)`` where ``lse_n`` is the
        natural log of softmax_n's denominator ``n + sum_j exp(s_ij)``.
    """
    b, h, n_q, d = q.shape
    hk, n_k, d_v = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty((b, h, n_q, d_v), device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, n_q, device=q.device, dtype=torch.float32)
    if b * h * n_q == 0:
        return out, lse
    if n_k == 0:  # no keys: the weights are 0 / n, and 0 for n = 0 too (as SDPA)
        out.zero_()
        lse.copy_(n if sink else torch.log(n))
        return out, lse
    d_pad = max(16, _next_power_of_2(d))
    dv_pad = max(16, _next_power_of_2(d_v))
    block_m, block_n, warps, stages = _blocks(max(d_pad, dv_pad), backward=False)
    grid = (b * h, _cdiv(n_q, block_m))
    _fwd_kernel[grid](
        q, k, v, n, out, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        h, h // hk, n_q, n_k, d, d_v, scale * LOG2E,
        CAUSAL=is_causal, IEEE=q.dtype == torch.float32, SINK=sink,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=d_pad, BLOCK_DV=dv_pad,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out, lse


def attention_bwd(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse_n: torch.Tensor,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward pass: ``(dq [B, H, L, D], dk [B, Hkv, S, D], dv [B, Hkv, S, Dv])`` from
    ``grad [B, H, L, Dv]``, the forward's ``out`` and ``lse_n [B, H, L]`` (float32)."""
    b, h, n_q, d = q.shape
    hk, n_k, d_v = k.shape[1], k.shape[2], v.shape[3]
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    # every element is written by the kernels
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    d_pad = max(16, _next_power_of_2(d))
    dv_pad = max(16, _next_power_of_2(d_v))
    block_m, block_n, warps, stages = _blocks(max(d_pad, dv_pad), backward=True)
    delta = row_dot(out, grad)
    ieee = q.dtype == torch.float32
    qk_scale = scale * LOG2E
    _bwd_dkdv_kernel[(b * hk, _cdiv(n_k, block_n))](
        q, k, v, grad, lse_n, delta, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad), *_strides(dk), *_strides(dv),
        h, hk, h // hk, n_q, n_k, d, d_v, qk_scale, scale,
        CAUSAL=is_causal, IEEE=ieee,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=d_pad, BLOCK_DV=dv_pad,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    _bwd_dq_kernel[(b * h, _cdiv(n_q, block_m))](
        q, k, v, grad, lse_n, delta, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad), *_strides(dq),
        h, h // hk, n_q, n_k, d, d_v, qk_scale, scale,
        CAUSAL=is_causal, IEEE=ieee,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=d_pad, BLOCK_DV=dv_pad,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return dq, dk, dv


def row_dot(out: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``rowsum(out * grad)`` over the last dimension of two ``[B, H, L, D]`` tensors (any
    strides), in float32: ``[B, H, L]``, one pass, no float32 copy of either input."""
    b, h, n_q, d = out.shape
    delta = torch.empty(b, h, n_q, device=out.device, dtype=torch.float32)
    if delta.numel() == 0:
        return delta.zero_()
    block = 16 if _interpreting() else 64
    _delta_kernel[(b * h, _cdiv(n_q, block))](
        out, grad, delta, n_q, d, *_strides(out), *_strides(grad), h,
        BLOCK_M=block, BLOCK_D=max(16, _next_power_of_2(d)),
    )  # fmt: skip
    return delta


def _row_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides of the rows of a per-row tensor ``[B, H, L]`` or ``[B, H, L, 1]``."""
    return t.stride(0), t.stride(1), t.stride(2)


def gate_rows(
    out: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor | None, log_n: float = 0.0
) -> torch.Tensor:
    """Turn a kernel's softmax output into softmax_n's, in one pass: ``out [B, H, L, D]`` (any
    strides) is scaled in place by ``sigmoid(lse - c)``; returns ``lse_n = logaddexp(lse, c)``
    float32, shaped and strided like ``lse`` (``[B, H, L]`` or ``[B, H, L, 1]``, float32). ``c``
    is ``sink[h]`` (``[H]`` float32 sink logits) or, without sinks, ``log_n`` (``-inf``: n=0)."""
    b, h, n_q, d = out.shape
    lse_n = torch.empty_like(lse, dtype=torch.float32)
    if out.numel() == 0:
        return lse_n.copy_(lse)
    block = 16 if _interpreting() else 64
    c = sink if sink is not None else lse_n  # an unused pointer without sinks
    _gate_rows_kernel[(b * h, _cdiv(n_q, block))](
        out, lse, lse_n, c, n_q, d, float(log_n), *_strides(out), *_row_strides(lse), h,
        C_PER_HEAD=sink is not None, BLOCK_M=block, BLOCK_D=max(16, _next_power_of_2(d)),
    )  # fmt: skip
    return lse_n


def sink_grad(
    out: torch.Tensor, grad: torch.Tensor, lse_n: torch.Tensor, sink: torch.Tensor
) -> torch.Tensor:
    """The sinks' gradient ``d sink [H]`` float32, ``-sum_{b, i} rowsum(out * grad) *
    exp(sink[h] - lse_n)``, from ``out`` and ``grad [B, H, L, D]`` (any strides) and ``lse_n``
    (``[B, H, L]`` or ``[B, H, L, 1]``) in one pass; the per-block sums are added in a fixed
    order (deterministic)."""
    b, h, n_q, d = out.shape
    if out.numel() == 0:
        return torch.zeros(h, device=out.device, dtype=torch.float32)
    block = 16 if _interpreting() else 64
    n_blocks = _cdiv(n_q, block)
    part = torch.empty(b, h, n_blocks, device=out.device, dtype=torch.float32)
    _extra_logit_grad_kernel[(b * h, n_blocks)](
        out, grad, lse_n, sink, part, n_q, d, *_strides(out), *_strides(grad),
        *_row_strides(lse_n), h, BLOCK_M=block, BLOCK_D=max(16, _next_power_of_2(d)),
    )  # fmt: skip
    return part.sum((0, 2))


__all__ = ["attention_bwd", "attention_fwd", "gate_rows", "row_dot", "sink_grad"]
