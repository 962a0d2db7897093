"""``norm_and_cast``: a layer's input and its layer norm, both in the autocast dtype, in one pass
(optionally after adding a residual branch).

Under autocast, a MoEUT layer feeds its float32 residual ``x`` to two places: through a layer
norm (which autocast runs in float32) to the selections, queries and keys, and as it is to the
values or the feedforward experts. Each consumer casts its input to bf16 itself, so a layer
application runs a norm kernel and two casts forward, and the norm's backward, two casts and
their sum backward. On CUDA :func:`norm_and_cast` does it in one kernel each way (both outputs
rounded from the same float32 values as before, so the results are the same up to the order of
float32 sums); elsewhere, outside autocast, under ``torch.compile`` (Inductor fuses the plain
ops itself) and where forward hooks would see the norm called, it is the plain
``(x, x, norm(x))``. It also takes a residual addition before the norm into its kernel (and the
cast of the branch's gradient into its backward kernel), and passes the residual stream
through, so that the gradient from the stream's later uses is added in its backward kernel
instead of by autograd.
"""

from __future__ import annotations

import functools

import torch
from switchhead.triton_support import kernels_can_run
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as _nn_module

# Widest rows the kernels take (one row per block of registers).
MAX_WIDTH = 8192
# Branch dtypes the kernel adds as torch would (in float32: float64 would promote the sum).
_BRANCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Set FUSED[0] = False for the plain (x, norm(x)) everywhere (benchmarks/ab_norm_cast.py
# compares the two in one process).
FUSED = [True]


@functools.cache
def _kernels():
    """:mod:`moeut.norm_cast_triton` (imports Triton: only where the kernels run; imported once,
    not at every call)."""
    from . import norm_cast_triton

    return norm_cast_triton


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` as ``[R, D]`` rows of contiguous channels (a view where it can be)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


class _NormCast(torch.autograd.Function):
    """``(s, s in dtype, norm(s) in dtype)`` for ``s = x`` (a view: the residual stream passes
    through, so its later gradient joins the backward kernel) or ``s = x + delta``."""

    @staticmethod
    def forward(ctx, x, delta, weight, bias, eps, dtype):
        shape = x.shape
        rows = _rows(x)
        s, xc, n, mean, rstd = _kernels().forward(
            rows, None if delta is None else _rows(delta), weight, bias, eps, dtype
        )
        ctx.save_for_backward(rows if s is None else s, weight, mean, rstd)
        ctx.set_materialize_grads(False)
        ctx.dtypes = (x.dtype, None if delta is None else delta.dtype)
        stream = x.view_as(x) if s is None else s.view(shape)
        return stream, xc.view(shape), n.view(shape)

    @staticmethod
    @once_differentiable  # the backward's kernels record no graph: no silent second derivative
    def backward(ctx, ds, dxc, dn):
        normed, weight, mean, rstd = ctx.saved_tensors
        x_dtype, delta_dtype = ctx.dtypes
        shape = next(g for g in (ds, dxc, dn) if g is not None).shape
        if dn is None:  # the norm unused: the copies' gradients only
            dx = sum(g.to(x_dtype) for g in (ds, dxc) if g is not None)
            ddelta = None if delta_dtype is None else dx.to(delta_dtype)
            return dx, ddelta, None, None, None, None
        flat = lambda t: None if t is None else t.reshape(-1, shape[-1]).contiguous()
        dx, ddelta, dw, db = _kernels().backward(
            normed, weight, mean, rstd, flat(dn), flat(dxc), flat(ds), delta_dtype
        )
        ddelta = None if ddelta is None else ddelta.view(shape)
        return dx.view(shape), ddelta, dw.to(weight.dtype), db.to(weight.dtype), None, None


def _fused_dtype(x: torch.Tensor, norm: torch.nn.Module) -> torch.dtype | None:
    """The autocast dtype where the fused kernels apply to ``x`` and ``norm``, else None."""
    device = x.device.type
    if (
        not FUSED[0]
        or device == "meta"
        or not torch.is_autocast_enabled(device)
        or torch.compiler.is_compiling()
        or x.dtype != torch.float32
        or not isinstance(norm, torch.nn.LayerNorm)
        or len(norm.normalized_shape) != 1
        or norm.weight is None
        or norm.bias is None
        or norm.weight.device != x.device
        or x.dim() == 0
        or x.shape[-1] != norm.normalized_shape[0]
        or not 0 < x.shape[-1] <= MAX_WIDTH
        or x.numel() == 0
        or _hooked(norm)
        or not kernels_can_run(x)
    ):
        return None
    return torch.get_autocast_dtype(device)


def _hooked(norm: torch.nn.Module) -> bool:
    """Forward hooks would see the norm called (its own or global ones): the plain ops call it,
    the kernels only read its parameters."""
    return bool(
        norm._forward_hooks
        or norm._forward_pre_hooks
        or getattr(_nn_module, "_global_forward_hooks", None)
        or getattr(_nn_module, "_global_forward_pre_hooks", None)
    )


def norm_and_cast(
    x: torch.Tensor, norm: torch.nn.Module, delta: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A residual stream's step for consumers under autocast: ``(s, s, norm(s))`` for ``s = x``
    or, with a branch ``delta`` (``x``'s shape, e.g. a bf16 attention output), ``s = x +
    delta``. The first ``s`` is the stream in ``x``'s dtype (use it onwards); the second and the
    layer norm over the last dimension come in the autocast dtype (the norm computed in
    float32, as autocast would).

    On CUDA (or under the Triton interpreter) for a float32 ``x`` and an affine
    ``torch.nn.LayerNorm``, all three come from one kernel, and the backward is one kernel (the
    gradients of ``x`` and ``delta`` in their dtypes, the stream's later gradient included) and
    a sum over its per-program weight gradients; otherwise the plain ops, whose consumers
    autocast casts. Gradients flow to ``x``, ``delta`` and the norm's weight and bias either
    way.
    """
    dtype = _fused_dtype(x, norm)
    fused = dtype is not None and (
        delta is None
        or (delta.shape == x.shape and delta.device == x.device and delta.dtype in _BRANCH_DTYPES)
    )
    if not fused:
        s = x if delta is None else x + delta
        return s, s, norm(s)
    assert isinstance(norm, torch.nn.LayerNorm)  # _fused_dtype checked it
    return _NormCast.apply(x, delta, norm.weight, norm.bias, norm.eps, dtype)
