"""``flash_attention_n``: softmax_n attention at the speed of a fused attention kernel.

Identity: with ``lse_i`` the log-sum-exp of row ``i`` of the (scaled, biased) scores, ``out0``
ordinary attention and ``lse_n = logaddexp(lse, log n)`` (the log of softmax_n's denominator),

    out_n = out0 * exp(lse - lse_n) = out0 * sigmoid(lse - log n).

A fused kernel that returns ``lse`` gives ``out_n`` for one in-place row scaling of its output.
The gradient needs no extra kernel either: the probabilities of softmax_n are
``exp(s_ij - lse_n_i)``, so the kernel's own backward, run with ``out_n`` in place of its output
and ``lse_n`` in place of its log-sum-exp, is exactly the backward of softmax_n attention (its row
term ``rowsum(dO * O)`` is then the softmax_n one). No extra tensor of the output's size is made
in either direction. The gradient of ``log n`` is ``-rowsum(grad * out_n) * (1 - sigmoid(lse -
log n))``.

Kernels, in order of preference: cuDNN attention on CUDA (compute capability >= 9.0, fp16/bf16,
head dim a multiple of 8 up to 128, no mask or bias, causal only for ``L == S``, no dropout;
PyTorch's own SDPA prefers it there too), PyTorch's flash attention on CUDA (the same, head dim up
to 256) and its CPU flash kernel (any float dtype, masks and biases that need no gradient). Each
CUDA kernel is used only while enabled for SDPA (``torch.nn.attention.sdpa_kernel`` or
``torch.backends.cuda.enable_*_sdp``). Other cases use ``slow_attention_n`` (same results,
quadratic memory).

Fully masked rows: ``lse = -inf``, so with ``n > 0`` the row is 0 (and NaN for ``n = 0``, as
softmax gives).
"""

from __future__ import annotations

import math

import torch

from .functional import _expand_kv, _log_n, attention_bias, slow_attention_n

_ATEN = torch.ops.aten


def _kernel_name(q, k, v, bias, is_causal) -> str | None:
    """The fused kernel that computes this attention (with its log-sum-exp), or None."""
    if bias is not None and bias.requires_grad:
        return None  # the kernels give no gradient for a bias (e.g. XL's positional term)
    if q.device.type == "cpu":
        return "cpu"
    if (
        q.device.type != "cuda"
        or bias is not None
        or q.dtype not in (torch.float16, torch.bfloat16)
        or q.shape[-1] % 8
        or v.shape[-1] != q.shape[-1]
        or (is_causal and q.shape[-2] != k.shape[-2])
    ):
        return None
    if (
        q.shape[-1] <= 128
        and torch.backends.cuda.cudnn_sdp_enabled()
        and torch.backends.cudnn.is_available()
        and torch.cuda.get_device_capability(q.device) >= (9, 0)
    ):
        return "cudnn"
    if q.shape[-1] <= 256 and torch.backends.cuda.flash_sdp_enabled():
        return "flash"
    return None


def _kernel_forward(name, q, k, v, bias, is_causal, scale):
    """``(out0, lse, state)``; ``state`` is what the kernel's backward needs besides tensors."""
    if name == "cpu":
        out, lse = _ATEN._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=bias, scale=scale
        )
        return out, lse, ()
    if name == "cudnn":
        res = _ATEN._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, is_causal, False, scale=scale
        )
    else:
        res = _ATEN._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)
    # (cum_seq_q, cum_seq_k, max_q, max_k, philox_seed, philox_offset)
    return res[0], res[1], tuple(res[2:8])


def _kernel_backward(name, state, grad, q, k, v, out, lse, bias, is_causal, scale):
    if name == "cpu":
        return _ATEN._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, is_causal, attn_mask=bias, scale=scale
        )
    cum_q, cum_k, max_q, max_k, seed, offset = state
    if name == "cudnn":  # attn_bias None reaches the op as an undefined tensor (no bias)
        return _ATEN._scaled_dot_product_cudnn_attention_backward(
            grad, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0,
            is_causal, scale=scale,
        )  # fmt: skip
    return _ATEN._scaled_dot_product_flash_attention_backward(
        grad, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, is_causal, seed, offset,
        scale=scale,
    )  # fmt: skip


class _FlashAttentionN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_n, bias, is_causal, scale, name):
        out, lse, state = _kernel_forward(name, q, k, v, bias, is_causal, scale)
        work = torch.promote_types(q.dtype, torch.float32)
        lse4 = (lse if lse.dim() == 4 else lse.unsqueeze(-1)).to(work)  # [B, H, L, 1]
        lse_n4 = torch.logaddexp(lse4, log_n.to(work))
        gate = torch.exp(lse4 - lse_n4)  # sigmoid(lse - log n)
        out.mul_(gate)  # the kernel's fresh output becomes out_n
        lse_n = torch.empty_like(lse).copy_(lse_n4.reshape(lse.shape))
        ctx.save_for_backward(
            q, k, v, out, lse_n, gate, bias if bias is not None else q.new_empty(0)
        )
        ctx.has_bias = bias is not None
        ctx.is_causal, ctx.scale, ctx.name, ctx.state = is_causal, scale, name, state
        ctx.log_n_shape = log_n.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse_n, gate, bias = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        dq, dk, dv = _kernel_backward(
            ctx.name, ctx.state, grad.contiguous(), q, k, v, out, lse_n, bias, ctx.is_causal,
            ctx.scale,
        )[:3]  # fmt: skip
        d_log_n = None
        if ctx.needs_input_grad[3]:
            row = (grad.to(gate.dtype) * out.to(gate.dtype)).sum(-1, keepdim=True) * (1 - gate)
            d_log_n = (-row).sum_to_size(ctx.log_n_shape)
        return dq, dk, dv, d_log_n, None, None, None, None


def flash_attention_n(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    softmax_n_param: float | torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    attn_mask: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """Attention with softmax_n for any real ``n >= 0`` (see the module docstring).

    Args:
        query: ``[B, H, L, D]``; key, value: ``[B, H or Hkv, S, D]`` (grouped-query) or
            ``[B, S, D]`` (shared by all heads).
        softmax_n_param: ``n``: ``None``/0 (softmax), a float, or a tensor broadcastable to
            ``[B, H, L, 1]`` (e.g. ``[H, 1, 1]`` per head, learnable).
        scale: score scale (default ``1/sqrt(D)``).
        dropout_p: attention dropout (applied by the reference path).
        attn_mask: SDPA convention (bool True = keep, or float added).
        attn_bias: additive float bias, e.g. ALiBi ``[H, L, S]``.
        is_causal: query ``i`` sees keys ``<= i + S - L`` (bottom-right aligned).

    Returns:
        ``[B, H, L, D]`` in the query's dtype.
    """
    if query.dim() != 4:
        raise ValueError(f"query must be [B, H, L, D], got {tuple(query.shape)}")
    key, value = _expand_kv(key, query), _expand_kv(value, query)
    if key.shape[-1] != query.shape[-1] or key.shape[-2] != value.shape[-2]:
        raise ValueError(
            f"incompatible shapes: query {tuple(query.shape)}, key {tuple(key.shape)}, "
            f"value {tuple(value.shape)}"
        )
    if not query.device == key.device == value.device:
        raise ValueError("query, key and value must be on one device")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if dropout_p > 0:
        return slow_attention_n(
            query,
            key,
            value,
            attn_mask,
            dropout_p,
            is_causal,
            scale,
            softmax_n_param,
            attn_bias=attn_bias,
        )
    n_q, n_k = query.shape[-2], key.shape[-2]
    causal_in_kernel = is_causal and n_q == n_k and attn_mask is None and attn_bias is None
    bias = None
    if not causal_in_kernel:
        bias = attention_bias(n_q, n_k, attn_mask, attn_bias, is_causal, query.device, query.dtype)
        if bias is not None:
            bias = bias.expand(query.shape[0], query.shape[1], n_q, n_k)
    q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
    kernel = _kernel_name(q, k, v, bias, causal_in_kernel)
    if kernel is None:
        return slow_attention_n(
            query,
            key,
            value,
            attn_mask,
            0.0,
            is_causal,
            scale,
            softmax_n_param,
            attn_bias=attn_bias,
        )
    work_dtype = torch.promote_types(query.dtype, torch.float32)
    log_n = _log_n(softmax_n_param, query)
    if isinstance(log_n, torch.Tensor):
        log_n = log_n.to(work_dtype)
    else:  # a fill kernel: torch.tensor(x, device) would sync
        log_n = torch.full((), log_n, device=query.device, dtype=work_dtype)
    return _FlashAttentionN.apply(q, k, v, log_n, bias, causal_in_kernel, scale, kernel)


def softmax_n_attention_fn(n: float | torch.Tensor):
    """An attention core with SDPA's signature for ``attention_fn`` hooks (SwitchHead, MoEUT,
    CoLT5): ``fn(q, k, v, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0)``."""

    def attention(q, k, v, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0):
        return flash_attention_n(
            q,
            k,
            v,
            softmax_n_param=n,
            scale=scale,
            dropout_p=dropout_p,
            attn_mask=attn_mask,
            is_causal=is_causal,
        )

    return attention
