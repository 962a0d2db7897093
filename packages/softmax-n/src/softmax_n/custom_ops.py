"""``torch.library`` registration of the fused Triton softmax_n attention (forward, backward,
fake tensors, autograd), so that ``torch.compile(fullgraph=True)`` traces through it without
graph breaks.

``softmax_n::triton_attention_fwd`` returns ``(out_n, lse_n)``; its autograd formula calls
``softmax_n::triton_attention_bwd`` for ``q, k, v`` and computes the gradient in ``n`` from the
saved output: ``d out_n / d n = -out_n / (n + sum_j exp(s_j)) = -out_n * exp(-lse_n)``. With
``sink`` true, ``n`` holds the extra logit itself (attention sinks, ``log n``) and its gradient is
``d out / d sink = -out * exp(sink - lse_n)``.
The kernels themselves live in ``triton_kernels.py`` (imported lazily: Triton is optional off
Linux).
"""

from __future__ import annotations

import torch


def _kernels():
    from . import triton_kernels

    return triton_kernels


@torch.library.custom_op("softmax_n::triton_attention_fwd", mutates_args=())
def triton_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n: torch.Tensor,
    is_causal: bool,
    scale: float,
    sink: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [B, H, L, D]``, ``k [B, Hkv, S, D]``, ``v [B, Hkv, S, Dv]``, ``n [B, H, L]`` float32
    (``n``, or with ``sink`` the sink logits) -> ``(out [B, H, L, Dv], lse_n [B, H, L] float32)``
    with ``lse_n = log(n + sum_j exp(s_j))``."""
    return _kernels().attention_fwd(q, k, v, n.contiguous(), is_causal, scale, sink)


@triton_attention_fwd.register_fake
def _(q, k, v, n, is_causal, scale, sink):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("softmax_n::triton_attention_bwd", mutates_args=())
def triton_attention_bwd(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse_n: torch.Tensor,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``out`` with respect to ``q, k, v`` (their shapes; ``dk``/``dv`` summed over
    the query heads of each key/value head)."""
    return _kernels().attention_bwd(grad, q, k, v, out, lse_n, is_causal, scale)


@triton_attention_bwd.register_fake
def _(grad, q, k, v, out, lse_n, is_causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, n, is_causal, scale, sink = inputs
    out, lse_n = output
    ctx.save_for_backward(q, k, v, out, lse_n, n)
    ctx.is_causal, ctx.scale, ctx.sink = is_causal, scale, sink
    ctx.mark_non_differentiable(lse_n)


def _backward(ctx, grad, _grad_lse):
    q, k, v, out, lse_n, n = ctx.saved_tensors
    dq = dk = dv = d_n = None
    if any(ctx.needs_input_grad[:3]):
        dq, dk, dv = triton_attention_bwd(grad, q, k, v, out, lse_n, ctx.is_causal, ctx.scale)
    if ctx.needs_input_grad[3]:
        # d out / d n = -out exp(-lse_n); d out / d sink = -out exp(sink - lse_n) (<= 1)
        inv = torch.exp((n if ctx.sink else 0.0) - lse_n)
        inv = torch.where(torch.isneginf(lse_n), 0.0, inv)
        row = (grad.to(torch.float32) * out.to(torch.float32)).sum(-1)
        d_n = (-row * inv).to(n.dtype)
    return dq, dk, dv, d_n, None, None, None


triton_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
