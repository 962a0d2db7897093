"""PyTorch's fused attention kernels (cuDNN, flash, memory-efficient, CPU flash) behind one
interface that returns the row log-sum-exp, plus the softmax_n identities used on top of them.

softmax_n weights are ``exp(s_ij - lse_n_i)`` with ``lse_n = logaddexp(lse, log n)``, so

    out_n = out0 * exp(lse - lse_n) = out0 * sigmoid(lse - log n)

and, because the Jacobian of softmax_n has the same form as softmax's
(``dy_j/dx_k = y_j (delta_jk - y_k)``), a fused kernel's own backward run with ``out_n`` as its
saved output and ``lse_n`` as its saved log-sum-exp returns the exact gradient of ``out_n``: it
recomputes the softmax_n weights from ``lse_n`` and uses ``rowsum(grad * out_n)``. No extra pass,
no extra memory.
"""

from __future__ import annotations

import torch

KERNELS = ("cpu", "cudnn", "flash", "efficient")
_HALF = (torch.float16, torch.bfloat16)


def _sdpa_params(q, k, v, bias, is_causal):
    params = torch.backends.cuda.SDPAParams
    try:
        return params(q, k, v, bias, 0.0, is_causal, False)
    except TypeError:  # torch < 2.5 has no enable_gqa argument
        return params(q, k, v, bias, 0.0, is_causal)


def pick_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    has_bias: bool,
    is_causal: bool,
    compiling: bool = False,
) -> str | None:
    """The fastest fused PyTorch kernel for these inputs, or None.

    ``is_causal`` here is the kernel's own (top-left) causality, only used when ``L == S``.
    Under ``torch.compile`` cuDNN's eligibility check is not traced: flash is used there.
    """
    if q.device.type == "cpu":
        return "cpu"
    if q.device.type != "cuda":
        return None
    same_dv = v.shape[-1] == q.shape[-1]
    if not has_bias and q.dtype in _HALF and same_dv:
        if not compiling and torch.backends.cuda.cudnn_sdp_enabled():
            try:
                ok = torch.backends.cuda.can_use_cudnn_attention(
                    _sdpa_params(q, k, v, None, is_causal)
                )
            except (RuntimeError, TypeError, AttributeError):
                ok = False
            if ok:
                return "cudnn"
        if q.shape[-1] % 8 == 0 and q.shape[-1] <= 256:
            return "flash"
    if q.dtype in (*_HALF, torch.float32) and q.shape[-1] % 8 == 0 and v.shape[-1] % 8 == 0:
        return "efficient"
    return None


def _pad_bias(bias: torch.Tensor) -> torch.Tensor:
    """The memory-efficient kernel needs the bias rows 16-element aligned (as SDPA pads them)."""
    s = bias.shape[-1]
    if s % 16 == 0 and bias.stride(-2) % 16 == 0:
        return bias
    padded = torch.nn.functional.pad(bias, (0, -s % 16))
    return padded[..., :s]


def forward(kernel, q, k, v, bias, is_causal, scale):
    """``(out0 [B, H, L, Dv], lse [B, H, L])``, ``lse`` natural-log per row, in float32 (float64
    for float64 inputs)."""
    n_q = q.shape[-2]
    if kernel == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=bias, scale=scale
        )
    elif kernel == "cudnn":
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, is_causal, False, scale=scale
        )
        out, lse = res[0], res[1].reshape(*q.shape[:-1])
    elif kernel == "flash":
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, is_causal, False, scale=scale
        )
        out, lse = res[0], res[1]
    elif kernel == "efficient":
        if bias is not None:
            bias = _pad_bias(bias)
        res = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, is_causal, scale=scale
        )
        out, lse = res[0], res[1][..., :n_q]
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    return out, lse.to(torch.promote_types(q.dtype, torch.float32))


def backward(kernel, grad, q, k, v, out, lse_n, bias, is_causal, scale):
    """``(dq, dk, dv)`` of softmax_n attention from a fused kernel's backward (module docstring)."""
    b, h, n_q = lse_n.shape
    n_k = k.shape[-2]
    grad = grad.contiguous() if grad.stride() != out.stride() else grad
    if kernel == "cpu":
        lse_k = torch.empty(b, n_q, h, dtype=lse_n.dtype).transpose(1, 2).copy_(lse_n)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse_k, 0.0, is_causal, attn_mask=bias, scale=scale
        )[:3]
    empty = torch.empty(0, device=q.device, dtype=torch.int64)
    if kernel == "cudnn":
        seed = torch.zeros((), device=q.device, dtype=torch.int64)
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad,
            q,
            k,
            v,
            out,
            lse_n.unsqueeze(-1),
            seed,
            seed,
            None,
            empty,
            empty,
            n_q,
            n_k,
            0.0,
            is_causal,
            scale=scale,
        )
    if kernel == "flash":
        rng = torch.empty(2, device=q.device, dtype=torch.uint64)
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad,
            q,
            k,
            v,
            out,
            lse_n,
            empty,
            empty,
            n_q,
            n_k,
            0.0,
            is_causal,
            rng,
            empty,
            scale=scale,
        )
    if kernel == "efficient":
        pad = -n_q % 32
        lse_k = torch.nn.functional.pad(lse_n, (0, pad)) if pad else lse_n.contiguous()
        seed = torch.zeros((), device=q.device, dtype=torch.int64)
        if bias is not None:
            bias = _pad_bias(bias)
        return torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            grad,
            q,
            k,
            v,
            bias,
            out,
            lse_k,
            seed,
            seed,
            0.0,
            [True, True, True, False],
            is_causal,
            scale=scale,
        )[:3]
    raise ValueError(f"unknown kernel {kernel!r}")
