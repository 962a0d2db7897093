"""Gradients of expert weights used several times in one forward, summed by the kernels.

MoEUT applies each shared layer several times per step (9 times at 244M). Autograd sums the
weight's gradients from those uses itself: every use writes a fresh float32 gradient and autograd
adds it to the running sum, three passes over the weight's size per use (~7 ms of a 72 ms
MoEUT-244M step on an H100, moeut/benchmarks/results/profile_MoEUT_244M.txt). Inside
:func:`accumulate_weight_grads`, the eager ``moe_mlp`` and ``moe_linear`` calls on the given
weights instead add each use's gradient into one buffer in their weight-gradient kernels (the
first use writes it) and give autograd no gradient for the weight; one autograd node in front of
all the uses hands the buffer to autograd once, after every use's backward has run.

What autograd sees is unchanged: the weight's gradient is the same sum (in a fixed order, so
runs are reproducible), also for partial backward passes (a use outside the pass adds nothing)
and for several backward passes through a retained graph (each starts a new sum). Inactive while
``torch.compile`` traces (the custom ops return every gradient) and outside a grad-enabled
forward.

``deferred=True`` (opt-in) goes further: each use's backward keeps the operands of its
weight-gradient GEMM instead of running it, and the node in front of the uses runs ONE GEMM over
all of them (:func:`cvmm_kernel.moe_ops.combined_weight_grad`): every expert's rows of every use
in one reduction, so the float32 sum is written once instead of read and written per use, and
the GEMM's reduction is as many times longer as there are uses (with few rows per expert and use,
these GEMMs are latency-bound). The kept operands (the gradient rows of each use, and its inputs
that autograd would otherwise free after that use's backward) stay alive until the last use's
backward; the sum is the same up to float32 rounding (one reduction instead of one per use).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator

import torch


def matmul_f32(
    a: torch.Tensor, b: torch.Tensor, add_to: torch.Tensor | None = None
) -> torch.Tensor:
    """``a @ b`` (2-D, or batched 3-D) accumulated and returned in float32, for a weight
    gradient; with ``add_to`` (float32, 2-D) the sum ``add_to + a @ b``. cuBLAS writes float32
    from 16-bit inputs directly where this torch can (``out_dtype=``: one kernel, the sum
    included), else the inputs are widened first (and the product added to ``add_to`` in
    place)."""
    op = "mm" if a.dim() == 2 else "bmm"
    if add_to is not None:
        op = "addmm"
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and _OUT_DTYPE[op]:
        if add_to is not None:
            return torch.addmm(add_to, a, b, out_dtype=torch.float32)
        return (torch.mm if op == "mm" else torch.bmm)(a, b, out_dtype=torch.float32)
    product = (torch.mm if a.dim() == 2 else torch.bmm)(a.float(), b.float())
    return product if add_to is None else add_to.add_(product)


# torch >= 2.8: mm, bmm and addmm write float32 from 16-bit inputs (on CUDA)
_OUT_DTYPE = {op: hasattr(getattr(torch.ops.aten, op), "dtype") for op in ("mm", "bmm", "addmm")}


class SharedGrad:
    """The running gradient sum of one weight over its uses in one forward; with ``deferred``,
    also the weight-gradient GEMMs its uses left to run together (``pending``)."""

    __slots__ = ("deferred", "pending", "total")

    def __init__(self, deferred: bool = False) -> None:
        self.total: torch.Tensor | None = None
        self.deferred = deferred
        self.pending: list = []

    def target(self, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``(buffer, accumulate)`` for a weight-gradient kernel: a new buffer to write for the
        first use to run its backward, the same buffer to add to for the others."""
        if self.total is None:
            self.total = torch.empty_like(like)
            return self.total, False
        return self.total, True

    def add(self, grad: torch.Tensor) -> None:
        """Add a gradient computed separately (the reference path)."""
        self.total = grad if self.total is None else self.total.add_(grad)


def grad_buffer(
    shared: SharedGrad | None, like: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, bool]:
    """``(buffer, accumulate)`` for one use's weight gradient: ``shared``'s buffer (in ``like``'s
    dtype), or a fresh one to write, in ``dtype`` (None: ``like``'s)."""
    if shared is not None:
        return shared.target(like)
    return torch.empty_like(like, dtype=dtype), False


def settle(shared: SharedGrad | None, grad: torch.Tensor | None, in_buffer: bool):
    """What a use returns to autograd for the weight: ``None`` where ``shared`` sums it (after
    adding ``grad`` where it was not computed into the buffer), else ``grad``."""
    if shared is None:
        return grad
    if grad is not None and not in_buffer:
        shared.add(grad)
    return None


class _Collect(torch.autograd.Function):
    """An alias of the weight in front of all its uses: its backward runs after theirs and
    returns their sum (plus any gradient autograd brought from other uses of the alias)."""

    @staticmethod
    def forward(ctx, weight, shared):
        ctx.set_materialize_grads(False)  # no zeros of the weight's size when no use added one
        ctx.shared = shared
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        shared = ctx.shared
        total, shared.total = shared.total, None
        if shared.pending:
            from .moe_ops import combined_weight_grad

            pending, shared.pending = shared.pending, []
            combined = combined_weight_grad(pending)
            total = combined if total is None else total.add_(combined)
        if grad is not None:
            total = grad if total is None else total + grad
        return total, None


_ACTIVE = threading.local()


def _registry() -> dict[int, tuple[torch.Tensor, torch.Tensor, SharedGrad]]:
    if not hasattr(_ACTIVE, "weights"):
        _ACTIVE.weights = {}
    return _ACTIVE.weights


def accumulate_weight_grads(
    weights: Iterable[torch.Tensor], *, deferred: bool = False
) -> contextlib.AbstractContextManager[None]:
    """Within the block, eager ``moe_mlp``/``moe_linear`` calls on ``weights`` (leaf tensors
    that require grad) sum their gradients into one buffer per weight in the kernels; see the
    module docstring. A no-op for weights that need no gradient, with gradients disabled and
    while compiling. Not for activation checkpointing (recomputed uses would add again).

    ``deferred``: on the Triton path, run one weight-gradient GEMM per weight over all its uses
    after the last use's backward, instead of one per use adding to the sum (more memory held
    during the backward: each use's gradient rows)."""
    if torch.compiler.is_compiling():  # (torch 2.5's dynamo cannot trace the generator below)
        return contextlib.nullcontext()
    return _accumulating(weights, deferred)


@contextlib.contextmanager
def _accumulating(weights: Iterable[torch.Tensor], deferred: bool) -> Iterator[None]:
    registry = _registry()
    added = []
    if torch.is_grad_enabled():
        for weight in weights:
            if weight.requires_grad and id(weight) not in registry:
                shared = SharedGrad(deferred)
                registry[id(weight)] = (weight, _Collect.apply(weight, shared), shared)
                added.append(id(weight))
    try:
        yield
    finally:
        for key in added:
            registry.pop(key, None)


def shared_use(weight: torch.Tensor) -> tuple[torch.Tensor, SharedGrad | None]:
    """``(alias, its SharedGrad)`` for a weight inside :func:`accumulate_weight_grads` (with
    gradients enabled, not compiling), else ``(weight, None)``."""
    registry = getattr(_ACTIVE, "weights", None)
    if not registry or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return weight, None
    entry = registry.get(id(weight))
    if entry is None or entry[0] is not weight:
        return weight, None
    return entry[1], entry[2]
