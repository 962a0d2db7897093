"""Triton coordinate descent: forward and backward kernels, autograd glue and custom op.

One program per row loops over the row in blocks, so rows of any length work. The forward saves
only ``a`` and the log-sum-exp of every iteration (two scalars per row and iteration); the
backward recomputes ``b = -relu(s + a)`` from them and runs the iterations in reverse. With
``w = s + b_prev = min(s, -a_prev)`` the row maximum of ``w / eps`` is known in closed form, so
each forward iteration is one pass with one reduction.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .coor_descent import (
    check_inputs,
    check_mask,
    check_scores,
    coor_descent_reference,
    eps_schedule,
)

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - non-Linux installs
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "triton_coor_descent", "triton_supports"]


if HAS_TRITON:

    @triton.jit
    def _coor_fwd_kernel(
        S, M, LOGK, EPS, OUT, A, LSE, n, rows, n_iters,
        HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        base = row * n
        logk = tl.load(LOGK + row)
        # pass 0: row maximum, number of valid entries (-inf scores are masked out) and NaNs
        xmax = tl.max(tl.full((BLOCK,), -1.0e30, tl.float32), axis=0)
        cnt = tl.sum(tl.zeros((BLOCK,), tl.float32), axis=0)
        nans = tl.sum(tl.zeros((BLOCK,), tl.float32), axis=0)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < n
            if HAS_MASK:
                valid = valid & (tl.load(M + base + offs, mask=offs < n, other=0) != 0)
            x = tl.load(S + base + offs, mask=valid, other=0.0).to(tl.float32)
            finite_below = valid & (x != float("-inf"))
            xmax = tl.maximum(xmax, tl.max(tl.where(finite_below, x, -1.0e30), axis=0))
            cnt += tl.sum(finite_below.to(tl.float32), axis=0)
            nans += tl.sum((valid & (x != x)).to(tl.float32), axis=0)
        has_any = cnt > 0
        # iteration 0: w = s + b0 = 0 on valid entries
        e = tl.load(EPS)
        lse = tl.log(tl.maximum(cnt, 1.0))
        a = tl.where(has_any, e * (logk - lse), 0.0)
        tl.store(A + row, a)
        tl.store(LSE + row, lse)
        for it in range(1, n_iters):
            e = tl.load(EPS + it)
            m = tl.minimum(xmax, -a) / e
            acc = tl.zeros((BLOCK,), tl.float32)
            for start in range(0, n, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                valid = offs < n
                if HAS_MASK:
                    valid = valid & (tl.load(M + base + offs, mask=offs < n, other=0) != 0)
                x = tl.load(S + base + offs, mask=valid, other=0.0).to(tl.float32)
                z = tl.minimum(x, -a) / e - m  # -inf scores: exp(-inf) = 0
                acc += tl.exp(tl.where(valid, z, -1.0e30))
            lse = m + tl.log(tl.maximum(tl.sum(acc, axis=0), 1.0e-30))
            a = tl.where(has_any, e * (logk - lse), 0.0)
            tl.store(A + it * rows + row, a)
            tl.store(LSE + it * rows + row, lse)
        # a NaN score makes its row NaN (as in the reference; min/max may drop NaNs): the final
        # a is stored as NaN, which the backward reads as the row's NaN flag
        nan_or_0 = tl.where(nans > 0, float("nan"), 0.0)
        a = a + nan_or_0
        tl.store(A + (n_iters - 1) * rows + row, a)
        e = tl.load(EPS + n_iters)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < n
            if HAS_MASK:
                valid = valid & (tl.load(M + base + offs, mask=offs < n, other=0) != 0)
            x = tl.load(S + base + offs, mask=valid, other=0.0).to(tl.float32)
            y = tl.where(valid, tl.exp(tl.minimum(x + a, 0.0) / e), 0.0)
            y = tl.where(valid, y + nan_or_0, y)
            tl.store(OUT + base + offs, y.to(OUT.dtype.element_ty), mask=offs < n)

    @triton.jit
    def _coor_bwd_kernel(
        S, M, EPS, A, LSE, GOUT, GS, n, rows, n_iters,
        HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        base = row * n
        # output: y = exp(min(s + a_T, 0) / e_T)
        e = tl.load(EPS + n_iters)
        a = tl.load(A + (n_iters - 1) * rows + row)
        nan_or_0 = a - a  # NaN for a row with a NaN score: NaN gradients on its valid entries
        acc = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < n
            if HAS_MASK:
                valid = valid & (tl.load(M + base + offs, mask=offs < n, other=0) != 0)
            x = tl.load(S + base + offs, mask=valid, other=0.0).to(tl.float32)
            go = tl.load(GOUT + base + offs, mask=valid, other=0.0).to(tl.float32)
            u = x + a
            y = tl.exp(tl.where(valid, tl.minimum(u, 0.0) / e, -1.0e30))
            g = tl.where(valid & (u <= 0.0), go * y / e, 0.0)
            g = tl.where(valid, g + nan_or_0, g)
            acc += g
            tl.store(GS + base + offs, g, mask=offs < n)
        ga = tl.where(a != a, 0.0, tl.sum(acc, axis=0))
        # iterations it = T-1 .. 1: a_it = e_it (logk - lse_it(min(s, -a_{it-1}) / e_it))
        for step in range(1, n_iters):
            it = n_iters - step
            e = tl.load(EPS + it)
            lse = tl.load(LSE + it * rows + row)
            ap = tl.load(A + (it - 1) * rows + row)
            acc = tl.zeros((BLOCK,), tl.float32)
            for start in range(0, n, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                valid = offs < n
                if HAS_MASK:
                    valid = valid & (tl.load(M + base + offs, mask=offs < n, other=0) != 0)
                x = tl.load(S + base + offs, mask=valid, other=0.0).to(tl.float32)
                p = tl.exp(tl.where(valid, tl.minimum(x, -ap) / e - lse, -1.0e30))
                gw = -ga * p
                ind = (x + ap) > 0.0
                gx = tl.load(GS + base + offs, mask=offs < n, other=0.0)
                gx += tl.where(ind, 0.0, gw)
                tl.store(GS + base + offs, gx, mask=offs < n)
                acc += tl.where(ind, gw, 0.0)
            ga = -tl.sum(acc, axis=0)


# launch configuration: a row is streamed in blocks of up to max_block elements, with up to
# num_warps warps (fewer for short rows: 256 elements per warp). Tuned on the H100 by the
# benchmark (16 x 32768: 4096/16 was the fastest of 2048/8 .. 16384/32). The shipped defaults:
# a call passes others as triton_coor_descent(..., max_block=, num_warps=).
CONFIG = {"max_block": 4096, "num_warps": 16}


def _launch(n: int, max_block: int | None, num_warps: int | None) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` of the kernels for rows of ``n`` elements, under the caps
    ``max_block`` and ``num_warps`` (None: ``CONFIG``'s)."""
    cap = CONFIG["max_block"] if max_block is None else max_block
    block = max(16, min(cap, triton.next_power_of_2(n)))
    warps = CONFIG["num_warps"] if num_warps is None else num_warps
    return block, max(1, min(warps, block // 256))


def _check_launch(max_block: int | None, num_warps: int | None) -> None:
    """The launch caps of :func:`triton_coor_descent`, checked before anything runs."""
    for name, value, low, high in (
        ("max_block", max_block, 16, None),
        ("num_warps", num_warps, 1, 32),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int or None, got {value!r}")
        if value < low or (high is not None and value > high) or value & (value - 1):
            bounds = f"from {low} to {high}" if high is not None else f">= {low}"
            raise ValueError(f"{name} must be a power of two {bounds}, got {value}")


def _forward_impl(
    s: Tensor,
    mask: Tensor | None,
    logk: Tensor,
    eps: Tensor,
    n_iters: int,
    max_block: int | None = None,
    num_warps: int | None = None,
):
    rows, n = s.shape
    out = torch.empty_like(s)
    a_hist = torch.empty((n_iters, rows), device=s.device, dtype=torch.float32)
    lse_hist = torch.empty_like(a_hist)
    if rows > 0:
        m = mask if mask is not None else s  # dummy pointer when HAS_MASK is False
        block, warps = _launch(n, max_block, num_warps)
        _coor_fwd_kernel[(rows,)](
            s, m, logk, eps, out, a_hist, lse_hist, n, rows, n_iters,
            HAS_MASK=mask is not None, BLOCK=block, num_warps=warps,
        )  # fmt: skip
    return out, a_hist, lse_hist


def _backward_impl(
    s, mask, eps, a_hist, lse_hist, grad_out, n_iters: int, max_block=None, num_warps=None
) -> Tensor:
    rows, n = s.shape
    gs = torch.empty((rows, n), device=s.device, dtype=torch.float32)
    if rows > 0:
        m = mask if mask is not None else s
        block, warps = _launch(n, max_block, num_warps)
        _coor_bwd_kernel[(rows,)](
            s, m, eps, a_hist, lse_hist, grad_out.contiguous(), gs, n, rows, n_iters,
            HAS_MASK=mask is not None, BLOCK=block, num_warps=warps,
        )  # fmt: skip
    return gs.to(s.dtype)


# custom ops: torch.compile(fullgraph=True) traces through them; autograd is registered below.
# max_block, num_warps: the launch caps (None: CONFIG's), kept for the backward.
@torch.library.custom_op("colt5_routing::coor_descent_fwd", mutates_args=())
def _coor_fwd_op(
    s: Tensor,
    mask: Tensor | None,
    logk: Tensor,
    eps: Tensor,
    n_iters: int,
    max_block: int | None = None,
    num_warps: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    return _forward_impl(s, mask, logk, eps, n_iters, max_block, num_warps)


@_coor_fwd_op.register_fake
def _(s, mask, logk, eps, n_iters, max_block=None, num_warps=None):
    hist = s.new_empty((n_iters, s.shape[0]), dtype=torch.float32)
    return torch.empty_like(s), hist, torch.empty_like(hist)


@torch.library.custom_op("colt5_routing::coor_descent_bwd", mutates_args=())
def _coor_bwd_op(
    s: Tensor,
    mask: Tensor | None,
    eps: Tensor,
    a_hist: Tensor,
    lse_hist: Tensor,
    grad_out: Tensor,
    n_iters: int,
    max_block: int | None = None,
    num_warps: int | None = None,
) -> Tensor:
    return _backward_impl(s, mask, eps, a_hist, lse_hist, grad_out, n_iters, max_block, num_warps)


@_coor_bwd_op.register_fake
def _(s, mask, eps, a_hist, lse_hist, grad_out, n_iters, max_block=None, num_warps=None):
    return torch.empty_like(s)


def _setup_context(ctx, inputs, output):
    s, mask, _, eps, n_iters, max_block, num_warps = inputs
    _, a_hist, lse_hist = output
    ctx.save_for_backward(s, mask, eps, a_hist, lse_hist)
    ctx.settings = (n_iters, max_block, num_warps)


def _op_backward(ctx, grad_out, _grad_a, _grad_lse):
    s, mask, eps, a_hist, lse_hist = ctx.saved_tensors
    gs = _coor_bwd_op(s, mask, eps, a_hist, lse_hist, grad_out, *ctx.settings)
    return gs, None, None, None, None, None, None


_coor_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_supports(s: Tensor) -> bool:
    """Whether the Triton kernels can take ``s``: Triton installed, a CUDA tensor (a CPU one under
    ``TRITON_INTERPRET=1``) of fp32/fp16/bf16. float64 and meta tensors go to the reference."""
    if not HAS_TRITON or s.dtype not in KERNEL_DTYPES:
        return False
    return s.is_cuda or (s.device.type == "cpu" and _interpreting())


def _bf16_in_fp32(s: Tensor) -> bool:
    """bf16 scores are widened to fp32 for the kernels where bf16 loads/stores are not native:
    GPUs before Ampere (compute capability < 8.0) and the CPU interpreter (numpy has no bf16)."""
    if s.dtype != torch.bfloat16:
        return False
    if not s.is_cuda:
        return True
    return torch.cuda.get_device_capability(s.device) < (8, 0)


def triton_coor_descent(
    s: Tensor,
    *,
    n_iters: int,
    k: float | Tensor,
    eps: float = 0.1,
    eps_init: float | None = None,
    eps_decay: float = 1.0,
    mask: Tensor | None = None,
    checkpoint_segments: int = 1,
    max_block: int | None = None,
    num_warps: int | None = None,
) -> Tensor:
    """Coordinate descent with Triton kernels; same contract as ``coor_descent_reference``.

    ``s [..., n]`` (fp32/fp16/bf16, computed in fp32; float64 raises ``TypeError``: use the
    reference, which keeps it in float64), ``mask [..., n]`` boolean, ``True`` = keep, ``k`` a
    number or ``[...]`` tensor. Runs on CUDA tensors, or on CPU under ``TRITON_INTERPRET=1``; bf16
    is widened to fp32 for the kernels before Ampere and under the interpreter. Meta tensors get
    the reference's (shape-only) result. ``checkpoint_segments`` (>= 1) is accepted for
    compatibility with upstream; memory is already ``O(rows * n_iters)`` scalars beyond the input.

    ``max_block`` and ``num_warps``: the launch settings of this call's forward and backward
    kernels, caps on the elements a row is streamed by (a power of two >= 16) and on the warps
    per row (a power of two up to 32; fewer for short rows, 256 elements per warp); None: the
    shipped ``CONFIG`` (4096 and 16). The result does not depend on them beyond float32 rounding
    (the order of the row sums); ``benchmarks/bench_coor_descent.py`` sweeps them.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use backend='reference'")
    if isinstance(checkpoint_segments, bool) or not isinstance(checkpoint_segments, int):
        raise TypeError(f"checkpoint_segments must be an int, got {checkpoint_segments!r}")
    if checkpoint_segments < 1:
        raise ValueError(f"checkpoint_segments must be >= 1, got {checkpoint_segments}")
    _check_launch(max_block, num_warps)
    epsilons = eps_schedule(n_iters, eps, eps_init, eps_decay)
    check_scores(s)
    if s.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"triton coor_descent supports fp32/fp16/bf16, got {s.dtype}; use "
            "backend='reference' (float64 is computed in float64 there)"
        )
    if s.device.type == "meta":  # shapes only: nothing to launch
        return coor_descent_reference(
            s, n_iters=n_iters, k=k, eps=eps, eps_init=eps_init, eps_decay=eps_decay, mask=mask
        )
    if not s.is_cuda and not (s.device.type == "cpu" and _interpreting()):
        raise ValueError(
            f"triton_coor_descent needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), "
            f"got a tensor on {s.device}; use backend='reference' on this device"
        )
    kt = check_inputs(s, k, mask)
    mask = check_mask(mask, s)
    if s.numel() == 0:
        return s * 0
    if _bf16_in_fp32(s):
        return triton_coor_descent(
            s.float(), n_iters=n_iters, k=k, eps=eps, eps_init=eps_init,
            eps_decay=eps_decay, mask=mask, max_block=max_block, num_warps=num_warps,
        ).to(s.dtype)  # fmt: skip
    shape = s.shape
    n = shape[-1]
    s2 = s.reshape(-1, n).contiguous()
    m2 = None if mask is None else mask.reshape(-1, n).contiguous().view(torch.int8)
    logk = kt.reshape(-1).log().contiguous()
    eps_t = torch.tensor(epsilons, dtype=torch.float32, device=s.device)
    out = _coor_fwd_op(s2, m2, logk, eps_t, n_iters, max_block, num_warps)[0]
    return out.reshape(shape)
