"""``sigmoid_topk``: a sigmoid router's choice and gates, in one kernel each way on CUDA.

sigma-MoE and SwitchHead choose, per row of selection logits ``s [..., E]``, the ``k`` experts
with the largest scores ``sigmoid(s)`` and weight them by those scores. Written out that is a
sigmoid, a top-k, a gather and (SwitchHead) an index offset per head forward, and a scatter and
the sigmoid's derivative backward: six to eight small kernels per call, each a few tens of
microseconds of host time in an eager step that is host-bound
(moeut/benchmarks/results/host_overhead.md). Here the Triton path reads the logits once and
writes the indices and gates (forward) and writes the logits' gradient once (backward).

The ranking is by the logits (the sigmoid is increasing, and ranking before it keeps logits
that round to the same score apart); equal logits go to the lower index and NaN ranks first, as
:func:`cvmm_kernel.topk_indices`. The reference path (CPU, or ``backend="reference"``) is the
PyTorch expression with ``topk_indices``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .ops import Backend, resolve_backend
from .topk import MAX_WIDTH, topk_indices
from .traced_ops import triton_custom_op
from .triton_modules import triton_module


def _reference(logits, k, drop, global_index):
    scores = torch.sigmoid(logits)
    key = logits.detach()
    if drop is not None:
        key = key.masked_fill(drop, float("-inf"))
    index = topk_indices(key, k)
    gate = torch.gather(scores, -1, index)
    if global_index:
        e = logits.shape[-1]
        index = index + torch.arange(0, logits.shape[-2] * e, e, device=index.device)[:, None]
    return index, gate


def _rows(logits: torch.Tensor) -> torch.Tensor:
    """``[..., G, E]`` as ``[O, G, E]`` without a copy where the leading dims merge (a padded
    or per-head view of a projection's output), else contiguous."""
    view = logits if logits.dim() >= 2 else logits.unsqueeze(0)
    if view.stride(-1) != 1:
        view = view.contiguous()
    try:
        return view.view(-1, *view.shape[-2:])
    except RuntimeError:  # leading dims that do not merge
        return view.contiguous().view(-1, *view.shape[-2:])


def _forward(logits, drop, k, global_index):
    """The Triton forward: ``(index, gate)`` as ``[..., k]``."""
    rows = _rows(logits)
    flat_drop = None if drop is None else drop.reshape(-1, logits.shape[-1]).contiguous()
    index, gate = triton_module("router_triton").sigmoid_topk_forward(
        rows, flat_drop, k, global_index
    )
    shape = (*logits.shape[:-1], k)
    return index.view(shape), gate.view(shape)


def _backward(index, gate, grad_gate, shape, global_index):
    """The Triton backward: the logits' gradient, ``shape``."""
    k = index.shape[-1]
    flat_index, flat_gate = index.reshape(-1, k), gate.reshape(-1, k)
    dgate = grad_gate.reshape(flat_index.shape).to(gate.dtype).contiguous()
    groups = shape[-2] if len(shape) > 1 else 1
    dlogits = triton_module("router_triton").sigmoid_topk_backward(
        flat_index, flat_gate, dgate, shape[-1], groups, global_index
    )
    return dlogits.view(shape)


class _SigmoidTopK(torch.autograd.Function):
    """Eager: the kernels with the least host time per call."""

    @staticmethod
    def forward(ctx, logits, drop, k, global_index):
        index, gate = _forward(logits, drop, k, global_index)
        ctx.save_for_backward(index, gate)
        ctx.settings = (logits.shape, global_index)
        ctx.mark_non_differentiable(index)
        # no zeros made for the index's gradient (a fill launch per call in an eager backward)
        ctx.set_materialize_grads(False)
        return index, gate

    @staticmethod
    @once_differentiable  # the backward kernel records no graph: no silent second derivative
    def backward(ctx, _grad_index, grad_gate):
        if grad_gate is None:
            return None, None, None, None
        index, gate = ctx.saved_tensors
        return _backward(index, gate, grad_gate, *ctx.settings), None, None, None


# Compiled graphs: the same kernels as ops that Inductor launches from the graph, so that the
# backward keeps the k gates per row (the PyTorch expression keeps sigmoid(logits) or the
# logits, E per row: MoEUT-244M's 18 routers, 12.7 MB each at its benchmark shape).


@triton_custom_op("cvmm_kernel::sigmoid_topk")
def _sigmoid_topk_op(
    logits: torch.Tensor, drop: torch.Tensor | None, k: int, global_index: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(logits, drop, k, global_index)


@_sigmoid_topk_op.register_fake
def _(logits, drop, k, global_index):
    shape = (*logits.shape[:-1], k)
    return logits.new_empty(shape, dtype=torch.int64), logits.new_empty(shape)


@triton_custom_op("cvmm_kernel::sigmoid_topk_backward")
def _sigmoid_topk_backward_op(
    index: torch.Tensor, gate: torch.Tensor, grad_gate: torch.Tensor, width: int,
    global_index: bool,
) -> torch.Tensor:  # fmt: skip
    return _backward(index, gate, grad_gate, (*index.shape[:-1], width), global_index)


@_sigmoid_topk_backward_op.register_fake
def _(index, gate, grad_gate, width, global_index):
    return gate.new_empty(*index.shape[:-1], width)


def _setup_context(ctx, inputs, output):
    logits, _, _, global_index = inputs
    index, gate = output
    ctx.save_for_backward(index, gate)
    ctx.settings = (logits.shape[-1], global_index)
    ctx.mark_non_differentiable(index)


def _op_backward(ctx, _grad_index, grad_gate):
    index, gate = ctx.saved_tensors
    width, global_index = ctx.settings
    return _sigmoid_topk_backward_op(index, gate, grad_gate, width, global_index), None, None, None


_sigmoid_topk_op.register_autograd(_op_backward, setup_context=_setup_context)


def sigmoid_topk(
    logits: torch.Tensor,
    k: int,
    *,
    drop: torch.Tensor | None = None,
    global_index: bool = False,
    backend: Backend | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` experts with the largest ``sigmoid(logits)`` per row, and those scores.

    Args:
        logits: ``[..., E]`` floating point selection logits (differentiable; any strides).
        k: ``0 <= k <= E`` experts per row.
        drop: optional bool ``[..., E]``: experts hidden from the choice (expert dropout); they
            rank last, so a row chooses one only when fewer than ``k`` remain.
        global_index: number the experts of row group ``g`` (the dim before the last, e.g.
            SwitchHead's heads) ``g * E .. g * E + E - 1``: indices into the ``G * E`` expert
            matrices of all groups.
        backend: ``"reference"`` (PyTorch) or ``"triton"``; by default Triton on CUDA for rows
            of at most 4096 experts.

    Returns:
        ``(index, gate)``, both ``[..., k]``: int64 expert numbers in rank order (largest
        first; equal logits by lower index on the Triton path, NaN first) and ``sigmoid`` of
        their logits in ``logits``' dtype. Gradients flow from ``gate`` to ``logits``.

    Raises:
        TypeError, ValueError: for a non-float ``logits``, ``k`` out of range, a ``drop`` of
            another shape or dtype, ``global_index`` on 1-d logits, before any kernel.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {logits!r:.80}")
    if logits.dim() == 0 or not 0 <= k <= logits.shape[-1]:
        width = logits.shape[-1] if logits.dim() else 0
        raise ValueError(f"k must be in [0, {width}] for logits {tuple(logits.shape)}, got {k}")
    if drop is not None and (drop.dtype != torch.bool or drop.shape != logits.shape):
        raise ValueError(
            f"drop must be a bool tensor of the logits' shape {tuple(logits.shape)}, got "
            f"{drop.dtype} {tuple(drop.shape)}"
        )
    if global_index and logits.dim() < 2:
        raise ValueError("global_index needs logits [..., G, E] (a group dim before the experts)")
    chosen = resolve_backend(logits.device, backend)
    trivial = k == 0 or logits.numel() == 0 or logits.shape[-1] > MAX_WIDTH
    if chosen == "reference" or trivial:
        return _reference(logits, k, drop, global_index)
    if torch.compiler.is_compiling():
        if not logits.is_cuda:  # the interpreter's kernels are not traced into graphs
            return _reference(logits, k, drop, global_index)
        return _sigmoid_topk_op(logits, drop, k, global_index)
    return _SigmoidTopK.apply(logits, drop, k, global_index)
