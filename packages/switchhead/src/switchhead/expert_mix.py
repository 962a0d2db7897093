"""Gated mixing of every expert's projection by a sparse choice (SwitchHead's dense expert path).

The dense path computes all ``E`` experts of every head and keeps the ``k`` chosen ones:

- :func:`mix_experts` (values): ``out[..., :] = sum_j gate[..., j] * values[..., index[..., j],
  :]``;
- :func:`spread_experts` (output): ``out[..., e, :] = (sum of gate[..., j] with index[..., j] ==
  e) * x[..., :]``, zero for the experts not chosen, ready for one matmul with every expert's
  output matrix.

Written with PyTorch ops that is a multiply with a broadcast (a strided elementwise kernel over
``E`` times the values), a sum, and in the backward two more of each plus the gates' own
ranking kernels. On CUDA each function here is one Triton pass forward and one backward (gate
gradient included, :mod:`switchhead.expert_mix_triton`); elsewhere, and while ``torch.compile``
traces (Inductor fuses the plain ops itself), it is the reference, whose autograd gives the same
gradients.

``index`` must hold expert numbers in ``[0, E)`` (as :func:`cvmm_kernel.sigmoid_topk` returns):
the kernels do not check them. Internal to the layer; not part of the package's public API.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .triton_support import kernels_can_run


def _acc_dtype(*ts: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in ts:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def reference_mix_experts(
    values: torch.Tensor, index: torch.Tensor, gate: torch.Tensor
) -> torch.Tensor:
    """:func:`mix_experts` in PyTorch ops (any device; differentiable in values and gate)."""
    acc = _acc_dtype(values, gate)
    idx = index.unsqueeze(-1).expand(*index.shape, values.shape[-1])
    chosen = torch.gather(values, -2, idx).to(acc)  # [..., k, C]
    return (chosen * gate.unsqueeze(-1).to(acc)).sum(-2).to(values.dtype)


def reference_spread_experts(
    x: torch.Tensor, index: torch.Tensor, gate: torch.Tensor, n_experts: int
) -> torch.Tensor:
    """:func:`spread_experts` in PyTorch ops (any device; differentiable in x and gate)."""
    acc = _acc_dtype(x, gate)
    weights = (
        gate.new_zeros(*gate.shape[:-1], n_experts).to(acc).scatter_add(-1, index, gate.to(acc))
    )
    return (weights.unsqueeze(-1) * x.unsqueeze(-2).to(acc)).to(x.dtype)


def _kernels():
    from . import expert_mix_triton

    return expert_mix_triton


class _GatedRows(torch.autograd.Function):
    """Both functions' Triton path; each one's backward is the other one's kernel. ``n_experts``
    None: :func:`mix_experts` (``rows`` = values ``[..., E, C]``); else :func:`spread_experts`
    (``rows`` = ``x [..., C]``)."""

    @staticmethod
    def forward(ctx, rows, index, gate, n_experts):
        kernels = _kernels()
        if n_experts is None:
            out, _ = kernels.gather(rows, index, gate, None)
        else:
            out, _ = kernels.spread(rows, index, gate, n_experts, None)
        ctx.save_for_backward(rows, index, gate)
        ctx.n_experts = n_experts
        return out

    @staticmethod
    @once_differentiable  # the backward kernels record no graph: no silent second derivative
    def backward(ctx, grad):
        rows, index, gate = ctx.saved_tensors
        other = rows if ctx.needs_input_grad[2] else None  # the gate's gradient only if asked
        if ctx.n_experts is None:
            drows, dgate = _kernels().spread(grad, index, gate, rows.shape[-2], other)
        else:
            drows, dgate = _kernels().gather(grad, index, gate, other)
        return drows, None, None if dgate is None else dgate.to(gate.dtype), None


def kernels_run(t: torch.Tensor) -> bool:
    """Whether the Triton kernels run for ``t`` (:func:`~.triton_support.kernels_can_run`, and
    not while ``torch.compile`` traces)."""
    return kernels_can_run(t) and not torch.compiler.is_compiling()


def _use_kernels(rows: torch.Tensor, index: torch.Tensor, backend: str | None) -> bool:
    """Validates ``backend``; whether this call runs the kernels (``None``: CUDA tensors where
    :func:`kernels_run`)."""
    if backend not in (None, "reference", "triton"):
        raise ValueError(f"backend must be None, 'reference' or 'triton', got {backend!r}")
    if backend == "triton" and not kernels_run(rows):
        raise ValueError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1) of a 16/32-bit float "
            f"dtype, got {rows.device} {rows.dtype}"
        )
    if index.shape[-1] == 0 or rows.numel() == 0:
        return False
    if backend is None:
        return rows.device.type == "cuda" and kernels_run(rows)
    return backend == "triton"


def _check(rows: torch.Tensor, index: torch.Tensor, gate: torch.Tensor, lead: int) -> None:
    if index.dtype not in (torch.int32, torch.int64) or not gate.is_floating_point():
        raise TypeError(
            f"index must be int32/int64 and gate float, got {index.dtype}, {gate.dtype}"
        )
    if index.shape != gate.shape or index.shape[:-1] != rows.shape[:lead]:
        raise ValueError(
            f"index and gate must be [..., k] over the rows' leading dims "
            f"{tuple(rows.shape[:lead])}, got {tuple(index.shape)}, {tuple(gate.shape)}"
        )


def mix_experts(
    values: torch.Tensor, index: torch.Tensor, gate: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """``values [..., E, C]``, ``index``/``gate [..., k]`` -> ``[..., C]`` in values' dtype:
    the gate-weighted sum of the chosen experts' rows (float32 sums). ``backend``: ``None``
    (Triton where :func:`kernels_run`), ``"reference"`` or ``"triton"``."""
    _check(values, index, gate, values.dim() - 2)
    if not _use_kernels(values, index, backend):
        return reference_mix_experts(values, index, gate)
    return _GatedRows.apply(values, index, gate, None)


def spread_experts(
    x: torch.Tensor,
    index: torch.Tensor,
    gate: torch.Tensor,
    n_experts: int,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``x [..., C]``, ``index``/``gate [..., k]`` -> ``[..., n_experts, C]`` in x's dtype: ``x``
    times each expert's summed gate (zero where no slot chose it). ``backend`` as
    :func:`mix_experts`."""
    _check(x, index, gate, x.dim() - 1)
    if not _use_kernels(x, index, backend):
        return reference_spread_experts(x, index, gate, n_experts)
    return _GatedRows.apply(x, index, gate, n_experts)
