"""Expert gates of SwitchHead's dense expert path, as two fused ops.

- ``gated_sum(x, gate)``: ``y[..., h, :] = sum_e gate[..., h, e] * x[..., h, e, :]`` (the value
  of a head from all its value experts, unchosen ones with gate 0);
- ``gated_expand(r, gate)``: ``a[..., h, e, :] = gate[..., h, e] * r[..., h, :]`` (the input of
  the output experts, flattened over ``(h, e, :)`` for one matmul).

Each is the other's adjoint, so the backward of one is the other plus a row dot product
``dg[..., h, e] = <x[..., h, e, :], r[..., h, :]>`` fused into the same pass: one read of every
large tensor per direction and no ``[..., E, D]`` temporary beyond the op's own output.

One op, three paths: a PyTorch reference (any device), Triton kernels (CUDA, or CPU under
``TRITON_INTERPRET=1``), and ``torch.library`` custom ops with fake implementations and autograd,
so ``torch.compile(fullgraph=True)`` traces them. ``backend=None`` picks Triton for CUDA tensors
and the reference otherwise. Results have the dtype of ``x``/``r``, gate gradients that of
``gate``; arithmetic is in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import os

import torch

Backend = str  # "reference" | "triton"


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _dot(x: torch.Tensor, r: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    w = _work_dtype(x, r)
    return (x.to(w) * r.to(w).unsqueeze(-2)).sum(-1).to(dtype)


def gated_sum_reference(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x [..., E, D]``, ``gate [..., E]`` -> ``[..., D]``."""
    w = _work_dtype(x, gate)
    return (x.to(w) * gate.to(w).unsqueeze(-1)).sum(-2).to(x.dtype)


def gated_expand_reference(r: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``r [..., D]``, ``gate [..., E]`` -> ``[..., E, D]``."""
    w = _work_dtype(r, gate)
    return (r.to(w).unsqueeze(-2) * gate.to(w).unsqueeze(-1)).to(r.dtype)


# ----- custom ops on [M, H, E, D] / [M, H, D] / [M, H, E] -----


@torch.library.custom_op("switchhead::gated_sum_dot", mutates_args=())
def _gated_sum_dot(
    x: torch.Tensor, gate: torch.Tensor, r: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from .gating_triton import gated_sum

        return gated_sum(x, gate, r, x.dtype, gate.dtype)
    return gated_sum_reference(x, gate), _dot(x, r, gate.dtype)


@_gated_sum_dot.register_fake
def _(x, gate, r, backend):
    m, h, e, d = x.shape
    return x.new_empty(m, h, d), gate.new_empty(m, h, e)


@torch.library.custom_op("switchhead::gated_expand_dot", mutates_args=())
def _gated_expand_dot(
    r: torch.Tensor, gate: torch.Tensor, x: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from .gating_triton import gated_expand

        return gated_expand(r, gate, x, r.dtype, gate.dtype)
    return gated_expand_reference(r, gate), _dot(x, r, gate.dtype)


@_gated_expand_dot.register_fake
def _(r, gate, x, backend):
    m, h, d = r.shape
    e = gate.shape[-1]
    return r.new_empty(m, h, e, d), gate.new_empty(m, h, e)


@torch.library.custom_op("switchhead::gated_sum", mutates_args=())
def _gated_sum(x: torch.Tensor, gate: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        from .gating_triton import gated_sum

        return gated_sum(x, gate, None, x.dtype, gate.dtype)[0]
    return gated_sum_reference(x, gate)


@_gated_sum.register_fake
def _(x, gate, backend):
    m, h, _, d = x.shape
    return x.new_empty(m, h, d)


def _gated_sum_setup(ctx, inputs, output):
    x, gate, backend = inputs
    ctx.save_for_backward(x, gate)
    ctx.backend = backend


def _gated_sum_backward(ctx, grad):
    x, gate = ctx.saved_tensors
    grad_x, grad_gate = _gated_expand_dot(grad.to(x.dtype), gate, x, ctx.backend)
    return grad_x, grad_gate, None


_gated_sum.register_autograd(_gated_sum_backward, setup_context=_gated_sum_setup)


@torch.library.custom_op("switchhead::gated_expand", mutates_args=())
def _gated_expand(r: torch.Tensor, gate: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        from .gating_triton import gated_expand

        return gated_expand(r, gate, None, r.dtype, gate.dtype)[0]
    return gated_expand_reference(r, gate)


@_gated_expand.register_fake
def _(r, gate, backend):
    m, h, d = r.shape
    return r.new_empty(m, h, gate.shape[-1], d)


def _gated_expand_setup(ctx, inputs, output):
    r, gate, backend = inputs
    ctx.save_for_backward(r, gate)
    ctx.backend = backend


def _gated_expand_backward(ctx, grad):
    r, gate = ctx.saved_tensors
    grad_r, grad_gate = _gated_sum_dot(grad.to(r.dtype), gate, r, ctx.backend)
    return grad_r, grad_gate, None


_gated_expand.register_autograd(_gated_expand_backward, setup_context=_gated_expand_setup)


# ----- public entry points -----


def _resolve(device: torch.device, backend: Backend | None) -> Backend:
    if backend is None:
        if device.type != "cuda":
            return "reference"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "reference"
        return "triton"
    if backend not in ("reference", "triton"):
        raise ValueError(f"unknown backend {backend!r}; use 'reference' or 'triton'")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 "
            "before importing triton to run the kernels on the CPU"
        )
    return backend


def _check(name: str, big: torch.Tensor, gate: torch.Tensor, lead: tuple[int, ...]) -> None:
    if not gate.dtype.is_floating_point or not big.dtype.is_floating_point:
        raise TypeError(f"{name}: expected floating tensors, got {big.dtype} and {gate.dtype}")
    if big.device != gate.device:
        raise ValueError(f"{name}: tensors on {big.device} and {gate.device}")
    if gate.dim() < 2 or tuple(gate.shape[:-1]) != lead:
        raise ValueError(
            f"{name}: gate must be [..., H, E] with [..., H] = {list(lead)}, got {list(gate.shape)}"
        )


def gated_sum(x: torch.Tensor, gate: torch.Tensor, backend: Backend | None = None) -> torch.Tensor:
    """``x [..., H, E, D]``, ``gate [..., H, E]`` -> ``[..., H, D]``: ``sum_e gate_e * x_e``."""
    if x.dim() < 3:
        raise ValueError(f"gated_sum: x must be [..., H, E, D], got {tuple(x.shape)}")
    if gate.shape[-1:] != x.shape[-2:-1]:
        raise ValueError(f"gated_sum: {gate.shape[-1]} gates for {x.shape[-2]} experts")
    _check("gated_sum", x, gate, tuple(x.shape[:-2]))
    backend = _resolve(x.device, backend)
    lead = x.shape[:-3]
    y = _gated_sum(x.reshape(-1, *x.shape[-3:]), gate.reshape(-1, *gate.shape[-2:]), backend)
    return y.view(*lead, *y.shape[-2:])


def gated_expand(
    r: torch.Tensor, gate: torch.Tensor, backend: Backend | None = None
) -> torch.Tensor:
    """``r [..., H, D]``, ``gate [..., H, E]`` -> ``[..., H, E, D]``: ``gate_e * r``."""
    if r.dim() < 2:
        raise ValueError(f"gated_expand: r must be [..., H, D], got {tuple(r.shape)}")
    _check("gated_expand", r, gate, tuple(r.shape[:-1]))
    backend = _resolve(r.device, backend)
    lead = r.shape[:-2]
    a = _gated_expand(r.reshape(-1, *r.shape[-2:]), gate.reshape(-1, *gate.shape[-2:]), backend)
    return a.view(*lead, *a.shape[-3:])
