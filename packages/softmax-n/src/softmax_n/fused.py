"""``flash_attention_n_triton``: softmax_n attention as one fused Triton flash-attention kernel.

Unlike ``flash_attention_n`` (PyTorch's fused kernels plus a gate on their output), the extra
logit ``log n`` lives inside the kernel's online softmax, so forward and backward are single
FlashAttention-2 style passes for any real ``n >= 0``, including causal attention with
``L != S`` (bottom-right) and grouped-query heads without copies. Attention sinks (``sink``,
one logit per head) are the same extra logit, given to the kernel in log space. Inputs are
validated here, before any kernel is compiled or launched.

Inputs no kernel can take go to the PyTorch reference (``slow_attention_n``, computed in float32
and returned in the inputs' dtype) instead: meta tensors (shapes only), a zero head dim, and, with
a warning, bfloat16 under Triton's interpreter (numpy has no bfloat16: the kernels would return
garbage) or on a GPU older than Ampere (compute capability < 8.0: no bfloat16 ``tl.dot``).
float64 raises ``TypeError``.
"""

from __future__ import annotations

import os
import warnings

import torch

from .custom_ops import triton_attention_fwd
from .functional import (
    _check_n,
    _check_n_rows,
    _check_qkv,
    _check_scale,
    _check_sink,
    _reference,
)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        hint = (
            "; flash_attention_n or slow_attention_n take float64" if t.is_floating_point() else ""
        )
        raise TypeError(
            f"{name}: the Triton kernel takes float16, bfloat16 or float32, got {t.dtype}{hint}"
        )
    return t


def _check_device(device: torch.device) -> None:
    if device.type in ("cuda", "meta"):
        return
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    hint = (
        " (CPU tensors run only in Triton's interpreter: set TRITON_INTERPRET=1 before Triton "
        "is imported)"
        if device.type == "cpu"
        else ""
    )
    raise ValueError(
        f"flash_attention_n_triton needs CUDA tensors, got {device.type}{hint}; "
        "flash_attention_n or slow_attention_n run anywhere"
    )


def _n_rows(n: float | torch.Tensor | None, query: torch.Tensor) -> torch.Tensor:
    """``n`` as ``[B, H, L]`` float32 on the query's device (differentiable in a tensor ``n``);
    type, values and shape checked first (``softmax_n.functional.N_SHAPES``)."""
    b, h, n_q = query.shape[:3]
    _check_n(n)
    _check_n_rows(n, (b, h, n_q))
    if n is None:
        n = 0.0
    if isinstance(n, torch.Tensor):
        rows = torch.broadcast_to(n, (b, h, n_q, 1))
        return rows[..., 0].to(query.device, torch.float32).contiguous()
    return torch.full((b, h, n_q), float(n), device=query.device, dtype=torch.float32)


def _fallback_reason(query: torch.Tensor) -> str | None:
    """Why no Triton kernel can take these (checked) inputs, or None."""
    if query.dtype != torch.bfloat16:
        return None
    if query.device.type == "cpu":
        return "Triton's interpreter has no bfloat16 (numpy has none)"
    if query.device.type == "cuda" and torch.cuda.get_device_capability(query.device) < (8, 0):
        cap = torch.cuda.get_device_capability(query.device)
        return f"bfloat16 needs compute capability >= 8.0 (Ampere), this GPU has {cap}"
    return None


def flash_attention_n_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    softmax_n_param: float | torch.Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention with ``softmax_n`` weights ``exp(s_ij) / (n + sum_j exp(s_ij))`` in one fused
    Triton kernel, forward and backward (gradients for query, key, value and a tensor ``n``).

    Args:
        query: ``[B, H, L, D]``, float16, bfloat16 or float32, ``D <= 256``.
        key: ``[B, Hkv, S, D]`` with ``H % Hkv == 0`` (grouped-query) or ``[B, S, D]`` (shared
            by all heads); value: the same with its own head dim ``Dv <= 256``; the query's
            dtype and device. Any strides.
        softmax_n_param: ``n``: ``None``/0 (plain softmax), a finite float ``>= 0``, or a tensor
            of such values shaped as one of ``softmax_n.functional.N_SHAPES`` (0-dim,
            ``[H, 1, 1]`` one learnable value per head, ``[H, L, 1]``, ``[B, H, L, 1]``, ...).
        scale: score scale (default ``1/sqrt(D)``).
        is_causal: query ``i`` sees keys ``j <= i + S - L`` (aligned bottom-right when ``L != S``).
        sink: attention sinks, ``[H]``, one logit per query head (any float dtype, on the
            query's device, learnable, with its gradient; no NaN or ``+inf``): softmax over the
            scores and one extra column ``sink[h]`` that is dropped (``n = exp(sink)``, never
            formed). Mutually exclusive with ``softmax_n_param``.

    Returns:
        ``[B, H, L, Dv]`` in the query's dtype. A row that sees no key is 0 for every ``n``
        (as ``F.scaled_dot_product_attention``), also with ``S = 0``.

    Raises:
        TypeError: non-tensor inputs, unsupported (float64, integer) or mixed dtypes, a
            non-float ``sink``.
        ValueError: bad shapes, mixed devices, a bad ``n`` (NaN, inf, negative, or a shape not
            in ``softmax_n.functional.N_SHAPES``), a non-finite scale, a device the kernel
            cannot run on (CUDA; CPU only under ``TRITON_INTERPRET=1``), a ``sink`` not shaped
            ``[H]``, on another device, with NaN or ``+inf``, or given with ``softmax_n_param``.
    """
    fn = "flash_attention_n_triton"
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, t)
    key, value = _check_qkv(query, key, value, fn)  # key, value: [B, Hkv, S, D / Dv]
    d, d_v = query.shape[-1], value.shape[-1]
    if d > MAX_HEAD_DIM or d_v > MAX_HEAD_DIM:
        raise ValueError(
            f"{fn}: head dims must be at most {MAX_HEAD_DIM}, got {d} (query/key) and {d_v} (value)"
        )
    scale = _check_scale(scale, d, fn)
    _check_sink(sink, softmax_n_param, query, fn)
    if sink is None:
        n_rows = _n_rows(softmax_n_param, query)
    else:  # [B, H, L] float32, differentiable (the gradient sums back to [H])
        b, h, n_q = query.shape[:3]
        n_rows = sink.to(torch.float32)[None, :, None].expand(b, h, n_q).contiguous()
    _check_device(query.device)
    reason = _fallback_reason(query)
    if reason is not None:
        warnings.warn(
            f"flash_attention_n_triton: {reason}; computing with the PyTorch reference "
            "(slow_attention_n) in float32 instead",
            stacklevel=2,
        )
    if reason is not None or query.device.type == "meta" or d == 0 or d_v == 0:
        f32 = (query.float(), key.float(), value.float())
        out = _reference(
            *f32, None, 0.0, bool(is_causal), scale, softmax_n_param, None, True, None, sink
        )
        return out.to(query.dtype)
    return triton_attention_fwd(
        query, key, value, n_rows, bool(is_causal), scale, sink is not None
    )[0]


__all__ = ["MAX_HEAD_DIM", "flash_attention_n_triton"]
