"""``torch.library`` registration of the fused softmax_n attention (forward, backward, autograd),
so that ``torch.compile(fullgraph=True)`` traces through it without graph breaks.

``softmax_n::attention_fwd`` returns ``(out_n, lse_n)``; ``kernel`` names the implementation:
``"triton"`` (the kernels of ``triton_kernels.py``) or one of PyTorch's fused kernels
(``fused.KERNELS``).
"""

from __future__ import annotations

import torch

from . import fused


def _triton():
    from . import triton_kernels

    return triton_kernels


@torch.library.custom_op("softmax_n::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n: torch.Tensor,
    bias: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [B, H, L, D]``, ``k, v [B, Hkv, S, D]``, ``n [B, H, L]`` float32 ->
    ``(out [B, H, L, Dv], lse_n [B, H, L])`` (float32; float64 for float64 inputs)."""
    if kernel == "triton":
        return _triton().attention_fwd(q, k, v, n.contiguous(), is_causal, scale)
    out, lse = fused.forward(kernel, q, k, v, bias, is_causal, scale)
    log_n = torch.log(n.to(lse.dtype))
    if bias is not None:
        # kernels disagree on fully masked rows (lse 0 or -inf, out 0 or NaN): fix them here
        lse = lse.masked_fill(torch.isneginf(bias).all(-1), float("-inf"))
    lse_n = torch.logaddexp(lse, log_n).contiguous()
    gate = torch.exp(lse - lse_n)  # = sigmoid(lse - log n); NaN where lse = log n = -inf
    out = out.mul_(gate.unsqueeze(-1).to(out.dtype))  # out is the kernel's fresh output
    if bias is not None:  # fully masked rows: 0 for n > 0 (NaN for n = 0, as softmax)
        out = out.masked_fill_((gate == 0).unsqueeze(-1), 0.0)
        out = out.masked_fill_(gate.isnan().unsqueeze(-1), float("nan"))
    return out, lse_n


@attention_fwd.register_fake
def _(q, k, v, n, bias, is_causal, scale, kernel):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    return out, q.new_empty(q.shape[:-1], dtype=torch.promote_types(q.dtype, torch.float32))


@torch.library.custom_op("softmax_n::attention_bwd", mutates_args=())
def attention_bwd(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse_n: torch.Tensor,
    bias: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``out`` with respect to ``q, k, v`` (shapes of ``q, k, v``)."""
    if kernel == "triton":
        return _triton().attention_bwd(grad, q, k, v, out, lse_n, is_causal, scale)
    dq, dk, dv = fused.backward(kernel, grad, q, k, v, out, lse_n, bias, is_causal, scale)
    return dq, dk, dv


@attention_bwd.register_fake
def _(grad, q, k, v, out, lse_n, bias, is_causal, scale, kernel):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, n, bias, is_causal, scale, kernel = inputs
    out, lse_n = output
    ctx.save_for_backward(q, k, v, out, lse_n, n, bias)
    ctx.is_causal, ctx.scale, ctx.kernel = is_causal, scale, kernel
    ctx.mark_non_differentiable(lse_n)


def _backward(ctx, grad, _grad_lse):
    q, k, v, out, lse_n, n, bias = ctx.saved_tensors
    dq = dk = dv = d_n = None
    if any(ctx.needs_input_grad[:3]):
        dq, dk, dv = attention_bwd(
            grad, q, k, v, out, lse_n, bias, ctx.is_causal, ctx.scale, ctx.kernel
        )
    if ctx.needs_input_grad[3]:
        # d out_n / d n = -out_n / (n + sum exp) = -out_n * exp(-lse_n) (finite at n = 0)
        inv = torch.where(lse_n == float("-inf"), 0.0, torch.exp(-lse_n))
        row = (grad.to(lse_n.dtype) * out.to(lse_n.dtype)).sum(-1)
        d_n = (-row * inv).to(n.dtype)
    return dq, dk, dv, d_n, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
