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
:func:`launch_traced` when :func:`is_traced`, and no two arguments of a kernel views of one
buffer (the routing's scratch as views of one allocation made MoEUT-244M's compiled step fault
with an illegal address under torch 2.11). Registered so: ``topk_indices`` and ``sigmoid_topk``
(forward and backward; its compiled backward then keeps the chosen indices and gates instead of
the PyTorch expression's ``sigmoid(logits)``: MoEUT-244M's compiled peak 7.47 -> 6.21 GiB, moeut's
``ab_compiled_sigmoid_topk.md``). The routing op
stays a custom op: as a triton_op (separate allocations) it matched eager but did not make the
compiled MoEUT step faster, which is GPU-bound on a quiet host (moeut's
``ab_compiled_routing.md``).
"""

from __future__ import annotations

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


def is_traced(t: object) -> bool:
    """``t`` is a fake or functional tensor: a body is being traced, not run."""
    return isinstance(t, (FakeTensor, FunctionalTensor))


def launch_traced(kernel: Any, grid: tuple[int, ...], *args: Any, **options: Any) -> None:
    """``kernel[grid](*args, **options)`` recorded for the compiled graph
    (``torch.library.wrap_triton``)."""
    torch.library.wrap_triton(kernel)[grid](*args, **options)
