"""Custom ops whose bodies only launch Triton kernels, registered so that ``torch.compile`` sees
the kernels.

A ``torch.library.custom_op`` is opaque to Inductor: each call of a compiled graph goes through
the dispatcher into the op's Python body, and the body's own Python (shape logic, allocations,
launch bookkeeping) runs again every time. On the H100 host a one-kernel op cost 34 us per call
that way against 12 us as a ``torch.library.triton_op`` (``benchmarks/results/op_overhead.md``).
``triton_op`` (torch >= 2.6) has Inductor trace the body once and launch its kernels from the
compiled graph's own wrapper; eagerly it runs the body as a custom op would. On older torch
:func:`triton_custom_op` falls back to ``custom_op``.

A body registered here must be traceable with fake tensors: decisions on shapes, dtypes and
Python values only (no data-dependent Python, no host sync), every kernel launched through
:func:`launch_traced` when :func:`is_traced` (``launcher.launch`` does so itself), and no two
arguments of a kernel views of one buffer (the routing's scratch as views of one allocation
made MoEUT-244M's compiled step fault with an illegal address under torch 2.11). Registered so:
``topk_indices`` and ``sigmoid_topk`` (forward and backward; its compiled backward then keeps
the chosen indices and gates instead of the PyTorch expression's ``sigmoid(logits)``:
MoEUT-244M's compiled peak 7.47 -> 6.21 GiB, moeut's ``ab_compiled_sigmoid_topk.md``), and, as
twins of their opaque custom ops (:func:`twin_ops`), the routing, ``moe_mlp`` and
``moe_linear`` ops: MoEUT-244M's plain compiled step 48.0-48.4 ms on an H100 against 70.8-88.0
with the custom ops, whose Python ran at every call (moeut's ``ab_compiled_traced_ops.md``; the
routing alone as a triton_op had shown no gain, ``ab_compiled_routing.md``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor


def triton_custom_op(name: str) -> Callable[[Callable[..., Any]], Any]:
    """Decorator: the function as the op ``name`` (``"namespace::op"``, no mutated arguments):
    ``torch.library.triton_op`` where this torch has it, else ``torch.library.custom_op``. Add
    ``register_fake`` and ``register_autograd`` as for a custom op."""
    make = getattr(torch.library, "triton_op", None) or torch.library.custom_op
    return make(name, mutates_args=())


# TRACED_OPS[0] = False: compiled ``moe_mlp`` / ``moe_linear`` calls on the Triton path go to the
# opaque custom ops instead of their triton_op twins (moeut's benchmarks/ab_compiled_traced_ops.py
# compares the two in one process). Read when a call is traced.
TRACED_OPS = [True]


def twin_ops(name: str, fn: Callable[..., Any]) -> tuple[Any, Any]:
    """``(opaque, traced)``: ``fn`` registered as the custom op ``name`` (``"namespace::op"``,
    no mutated arguments) and as the triton_op ``name + "_traced"`` (:func:`triton_custom_op`).
    For bodies that take a PyTorch reference path too: Inductor traces a triton_op's body, which
    the reference's data-dependent shapes (sorts, bincounts) would not survive, so compiled calls
    on the reference backend stay opaque (:func:`pick`). Traced with symbolic sizes (a graph
    compiled for dynamic shapes) the triton_op's body calls the opaque op: Inductor's
    decomposition of its traced kernels failed its own consistency check there (torch 2.11).
    Register the fake and the autograd formula on each."""
    opaque = torch.library.custom_op(name, mutates_args=())(fn)

    @functools.wraps(fn)
    def body(*args: Any, **kwargs: Any) -> Any:
        if any(isinstance(a, torch.Tensor) and _symbolic(a) for a in (*args, *kwargs.values())):
            return opaque(*args, **kwargs)
        return fn(*args, **kwargs)

    # fn's signature with its annotations resolved where fn is defined (torch infers the schema
    # from the signature, and this module could not resolve fn's string annotations)
    body.__signature__ = inspect.signature(fn, eval_str=True)  # type: ignore[attr-defined]
    return opaque, triton_custom_op(name + "_traced")(body)


def register_twins(
    forwards: tuple[Any, Any],
    backwards: tuple[Any, Any],
    forward_fake: Callable[..., Any],
    backward_fake: Callable[..., Any],
    autograd_backward: Callable[[Any], Callable[..., Any]],
    setup_context: Callable[..., Any],
) -> None:
    """The fakes and autograd formulas of a forward op and its backward op, each a pair from
    :func:`twin_ops`: each forward's formula, ``autograd_backward(backward op)``, calls the
    backward of its own kind."""
    for forward, backward in zip(forwards, backwards):
        forward.register_fake(forward_fake)
        backward.register_fake(backward_fake)
        forward.register_autograd(autograd_backward(backward), setup_context=setup_context)


def _symbolic(t: torch.Tensor) -> bool:
    return any(isinstance(size, torch.SymInt) for size in t.shape)


def pick(opaque: Any, traced: Any, backend: str) -> Any:
    """The op of a pair from :func:`twin_ops` that a compiled call on ``backend`` uses."""
    return traced if backend == "triton" and TRACED_OPS[0] else opaque


def is_traced(t: object) -> bool:
    """``t`` is a fake or functional tensor: a body is being traced, not run."""
    return isinstance(t, (FakeTensor, FunctionalTensor))


def launch_traced(kernel: Any, grid: tuple[int, ...], *args: Any, **options: Any) -> None:
    """``kernel[grid](*args, **options)`` recorded for the compiled graph
    (``torch.library.wrap_triton``)."""
    torch.library.wrap_triton(kernel)[grid](*args, **options)
