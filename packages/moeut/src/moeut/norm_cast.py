"""``norm_and_cast``: a layer's input and its layer norm, both in the autocast dtype, in one pass.

Under autocast, a MoEUT layer feeds its float32 residual ``x`` to two places: through a layer
norm (which autocast runs in float32) to the selections, queries and keys, and as it is to the
values or the feedforward experts. Each consumer casts its input to bf16 itself, so a layer
application runs a norm kernel and two casts forward, and the norm's backward, two casts and
their sum backward. On CUDA :func:`norm_and_cast` does it in one kernel each way (both outputs
rounded from the same float32 values as before, so the results are the same up to the order of
float32 sums); elsewhere, outside autocast and under ``torch.compile`` (Inductor fuses the plain
ops itself) it is the plain ``(x, norm(x))``.
"""

from __future__ import annotations

import torch
from switchhead.triton_support import kernels_can_run

# Widest rows the kernels take (one row per block of registers).
MAX_WIDTH = 8192
# Set FUSED[0] = False for the plain (x, norm(x)) everywhere (benchmarks/ab_norm_cast.py
# compares the two in one process).
FUSED = [True]


def _kernels():
    from . import norm_cast_triton

    return norm_cast_triton


class _NormCast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, dtype):
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        xc, n, mean, rstd = _kernels().forward(rows, weight, bias, eps, dtype)
        ctx.save_for_backward(rows, weight, mean, rstd)
        ctx.set_materialize_grads(False)
        ctx.x_dtype = x.dtype
        return xc.view(shape), n.view(shape)

    @staticmethod
    def backward(ctx, dxc, dn):
        rows, weight, mean, rstd = ctx.saved_tensors
        shape = (dn if dn is not None else dxc).shape
        if dn is None:  # only the cast copy was used
            return dxc.to(ctx.x_dtype), None, None, None, None
        flat = lambda t: t.reshape(-1, shape[-1]).contiguous()
        dx, dw, db = _kernels().backward(
            rows, weight, mean, rstd, flat(dn), None if dxc is None else flat(dxc)
        )
        return dx.view(shape), dw.to(weight.dtype), db.to(weight.dtype), None, None


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
        or not kernels_can_run(x)
    ):
        return None
    return torch.get_autocast_dtype(device)


def norm_and_cast(x: torch.Tensor, norm: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, norm(x))`` for a consumer under autocast: ``x [..., d]`` and its layer norm, both in
    the autocast dtype (the norm computed in float32, as autocast would).

    On CUDA (or under the Triton interpreter) for a float32 ``x`` and an affine
    ``torch.nn.LayerNorm`` over the last dimension, both come from one kernel (one backward
    kernel and a sum over its per-program weight gradients); otherwise the plain
    ``(x, norm(x))``, which autocast's consumers cast themselves. Gradients flow to ``x`` and
    to the norm's weight and bias either way.
    """
    dtype = _fused_dtype(x, norm)
    if dtype is None:
        return x, norm(x)
    assert isinstance(norm, torch.nn.LayerNorm)  # _fused_dtype checked it
    return _NormCast.apply(x, norm.weight, norm.bias, norm.eps, dtype)
