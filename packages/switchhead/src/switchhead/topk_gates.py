"""Top-k sigmoid gates of SwitchHead's expert selection, as one fused op.

``topk_gates(logits [..., E], k) -> gates [..., E]``: ``sigmoid(logits)`` for the ``k`` experts
with the highest score of each row, ``0`` for the others. Its gradient is
``d logits = d gates * s * (1 - s)`` on the chosen experts and ``0`` elsewhere, so only the chosen
experts' scores are trained, as in the authors' ``gather`` of the top-k scores.

The op replaces "cast, sigmoid, topk, scatter, multiply" (and their backward) with one kernel per
direction; it reads the logits in their own dtype (e.g. a bf16 slice of a fused projection)
and computes in float32 (float64 for float64). One op, three paths: a PyTorch reference (any
device), Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``; up to ``MAX_EXPERTS_TRITON``
experts), and a ``torch.library`` custom op with fake implementation and autograd.

Ties: the Triton kernels break exact score ties towards the lower expert index; the reference
uses ``torch.topk``, whose tie order is unspecified.
"""

from __future__ import annotations

import os

import torch

MAX_EXPERTS_TRITON = 64


def _work_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


def _reference_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    if k >= scores.shape[-1]:
        return torch.ones_like(scores, dtype=torch.bool)
    index = scores.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, True)


def topk_gates_reference(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The gates in plain PyTorch (differentiable by autograd)."""
    scores = logits.to(_work_dtype(logits)).sigmoid()
    with torch.no_grad():
        keep = _reference_keep(scores, k)
    return scores * keep


@torch.library.custom_op("switchhead::topk_gates", mutates_args=())
def _topk_gates(logits: torch.Tensor, k: int, backend: str) -> torch.Tensor:
    if backend == "triton":
        from .topk_gates_triton import topk_gates_fwd

        return topk_gates_fwd(logits, k, _work_dtype(logits))
    return topk_gates_reference(logits, k)


@_topk_gates.register_fake
def _(logits, k, backend):
    return logits.new_empty(logits.shape, dtype=_work_dtype(logits))


@torch.library.custom_op("switchhead::topk_gates_backward", mutates_args=())
def _topk_gates_backward(
    logits: torch.Tensor, grad: torch.Tensor, k: int, backend: str
) -> torch.Tensor:
    if backend == "triton":
        from .topk_gates_triton import topk_gates_bwd

        return topk_gates_bwd(logits, grad, k)
    scores = logits.to(_work_dtype(logits)).sigmoid()
    keep = _reference_keep(scores, k)
    return (grad * scores * (1 - scores) * keep).to(logits.dtype)


@_topk_gates_backward.register_fake
def _(logits, grad, k, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    logits, k, backend = inputs
    ctx.save_for_backward(logits)
    ctx.k = k
    ctx.backend = backend


def _backward(ctx, grad):
    (logits,) = ctx.saved_tensors
    return _topk_gates_backward(logits, grad, ctx.k, ctx.backend), None, None


_topk_gates.register_autograd(_backward, setup_context=_setup)


def topk_gates(logits: torch.Tensor, k: int, backend: str | None = None) -> torch.Tensor:
    """``logits [..., G, E]`` (any float dtype, any strides) -> gates ``[..., G, E]`` in float32
    (float64 for float64 logits): the sigmoid score of the top-``k`` experts of each row, else 0.

    ``backend``: ``"reference"`` or ``"triton"``; ``None`` picks Triton for CUDA tensors with at
    most ``MAX_EXPERTS_TRITON`` experts and the reference otherwise.
    """
    if logits.dim() < 2 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a float [..., G, E] tensor, got {logits.dtype} "
                         f"{tuple(logits.shape)}")  # fmt: skip
    n_experts = logits.shape[-1]
    if not 1 <= k <= n_experts:
        raise ValueError(f"k must be in [1, {n_experts}], got {k}")
    if backend is None:
        backend = "reference"
        if logits.device.type == "cuda" and n_experts <= MAX_EXPERTS_TRITON:
            try:
                import triton  # noqa: F401

                backend = "triton"
            except ImportError:
                pass
    elif backend == "triton":
        if logits.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {logits.device.type}); set "
                "TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU"
            )
        if n_experts > MAX_EXPERTS_TRITON:
            raise ValueError(f"the Triton kernels handle at most {MAX_EXPERTS_TRITON} experts")
    elif backend != "reference":
        raise ValueError(f"unknown backend {backend!r}; use 'reference' or 'triton'")
    lead = logits.shape[:-2]
    flat = logits.reshape(-1, *logits.shape[-2:])
    return _topk_gates(flat, k, backend).view(*lead, *logits.shape[-2:])
