"""A layer's fused input projection shared by its applications in one forward (MoEUT's repeats).

In eager mode a SwitchHead self-attention layer concatenates its q, k, selection (and dense value
expert) rows into one weight and runs one matmul. Applied several times in one forward (MoEUT
applies each shared layer 9 times at 244M), every application concatenates the rows again, casts
the result to the autocast dtype, and in the backward casts its weight gradient back to float32
and hands each parameter a slice that autograd adds to the parameter's sum: about ten launches
per application where one matmul each way does the work.

Inside :func:`share_input_projections`, with ``ENABLED[0]``, a layer's self-attention input
projection instead takes its fused weight in the compute dtype from a per-forward cache (made at
the first application), and every application's backward adds ``dy^T x`` to one float32 running
sum of the fused weight's gradient (one ``addmm`` with a float32 output); one autograd node
in front of all applications splits the sum into the parameters' gradients once (through the
fusion's own backward: padding and transposes undone by autograd). The same function and
gradients, up to the order of float32 sums. Not while ``torch.compile`` traces, nor with
gradients off; a parameter changed in place before the backward raises, as autograd would.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from cvmm_kernel.autocast_off import autocast_off
from cvmm_kernel.shared_grads import matmul_f32
from torch.autograd.function import once_differentiable

# A layer's fusion: its fused weight, each parameter p read as param(p).
Fusion = Callable[[Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]

# ENABLED[0] = False: every application makes its own fused weight (moeut's
# benchmarks/ab_norm_cast.py --switch shared-projection compares the two).
ENABLED = [True]


class SharedRows:
    """One layer's fused input-projection weight over its applications in one forward: the
    parameters, the fusion, the weight in the compute dtype (made once) and the float32 sum of
    the fused weight's gradient."""

    def __init__(self, params: list[torch.Tensor], fuse: Fusion):
        """``fuse(param)``: the fused weight, each parameter ``p`` read as ``param(p)``."""
        self.params = params
        self.fuse = fuse
        self.versions = [p._version for p in params]
        self.weights: dict[torch.dtype, torch.Tensor] = {}
        self.grad: torch.Tensor | None = None
        # in front of every application; dropped when the sharing block ends
        self.token: torch.Tensor | None = _Collect.apply(self, *params)

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The fused weight in ``dtype`` (made at the first call)."""
        if dtype not in self.weights:
            with torch.no_grad():
                self.weights[dtype] = self.fuse(lambda p: p).to(dtype)
        return self.weights[dtype]

    def add_grad(self, dy: torch.Tensor, x: torch.Tensor) -> None:
        """Adds ``dy^T x`` (``[rows, d]``) to the float32 sum."""
        if [p._version for p in self.params] != self.versions:
            raise RuntimeError(
                "a parameter of a shared input projection was modified in place between the "
                "forward and the backward"
            )
        self.grad = matmul_f32(dy.t(), x, add_to=self.grad)


class _Collect(torch.autograd.Function):
    """In front of every application: its backward runs after theirs and gives the parameters
    the gradient the applications summed."""

    @staticmethod
    def forward(ctx: Any, rows: SharedRows, *params: torch.Tensor) -> torch.Tensor:
        ctx.rows = rows
        ctx.set_materialize_grads(False)
        return params[0].new_empty(0)

    @staticmethod
    def backward(ctx: Any, _grad: torch.Tensor | None):
        rows: SharedRows = ctx.rows
        total, rows.grad = rows.grad, None
        if total is None:
            return (None,) * (1 + len(rows.params))
        with torch.enable_grad():  # the fusion's backward undoes its padding and transposes
            params = [p.detach().requires_grad_(p.requires_grad) for p in rows.params]
            swapped = {id(p): q for p, q in zip(rows.params, params, strict=True)}
            fused = rows.fuse(lambda p: swapped.get(id(p), p))
            wanted = [p for p in params if p.requires_grad]
            grads = iter(torch.autograd.grad(fused, wanted, total.to(fused.dtype)))
        return (None, *[next(grads) if p.requires_grad else None for p in params])


class _Linear(torch.autograd.Function):
    """``x @ w^T`` with the shared fused weight; the backward adds to the shared sum."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, _token: torch.Tensor, rows: SharedRows):
        w = rows.weight(x.dtype)
        ctx.save_for_backward(x)
        ctx.rows = rows
        return x @ w.t()

    @staticmethod
    @once_differentiable  # the cached weight records no graph: no silent second derivative
    def backward(ctx: Any, dy: torch.Tensor):
        (x,) = ctx.saved_tensors
        rows: SharedRows = ctx.rows
        dy = dy.to(x.dtype)
        flat_dy = dy.reshape(-1, dy.shape[-1])
        dx = None
        if ctx.needs_input_grad[0]:
            dx = (flat_dy @ rows.weight(x.dtype)).view(x.shape)
        if ctx.needs_input_grad[1]:  # a parameter wants its gradient
            rows.add_grad(flat_dy, x.reshape(-1, x.shape[-1]))
        return dx, None, None


def shared_linear(rows: SharedRows, x: torch.Tensor) -> torch.Tensor:
    """``x [..., d] @ fused^T`` in the autocast dtype (where autocast is on), its weight
    gradient added to ``rows``' sum."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    with autocast_off(x.device.type):
        return _Linear.apply(x, rows.token, rows)


_THREAD = threading.local()  # the active shared rows of each thread's forward


def _active() -> dict[int, SharedRows]:
    if not hasattr(_THREAD, "rows"):
        _THREAD.rows = {}
    return _THREAD.rows


def rows_of(module: torch.nn.Module) -> SharedRows | None:
    """The module's shared rows inside :func:`share_input_projections`, else None."""
    active = getattr(_THREAD, "rows", None)
    return active.get(id(module)) if active else None


def share_input_projections(
    modules: Iterable[torch.nn.Module],
) -> contextlib.AbstractContextManager[None]:
    """Within the block, each module's self-attention input projection shares its fused weight
    and its weight gradient's sum over the module's applications (where ``ENABLED``, gradients
    are on and nothing is compiling; see the module docstring). ``modules``: SwitchHead layers
    (``SwitchHeadCore``)."""
    if torch.compiler.is_compiling() or not ENABLED[0] or not torch.is_grad_enabled():
        return contextlib.nullcontext()  # (torch 2.5's dynamo cannot trace the generator below)
    return _sharing(list(modules))


@contextlib.contextmanager
def _sharing(modules: list[torch.nn.Module]) -> Iterator[None]:
    active, added = _active(), []
    for module in modules:
        params, fuse = module._shared_fusion()  # type: ignore[operator]
        if id(module) not in active and any(p.requires_grad for p in params):
            active[id(module)] = SharedRows(params, fuse)
            added.append(id(module))
    try:
        yield
    finally:
        for key in added:
            rows = active.pop(key, None)
            if rows is not None:  # the applications hold the token; rows must not (a cycle
                rows.token = None  # through _Collect's ctx would keep old graphs alive)
