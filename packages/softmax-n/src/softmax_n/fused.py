"""``flash_attention_n_triton``: softmax_n attention as one fused Triton flash-attention kernel.

Unlike ``flash_attention_n`` (PyTorch's fused kernels plus a gate on their output), the extra
logit ``log n`` lives inside the kernel's online softmax, so forward and backward are single
FlashAttention-2 style passes for any real ``n >= 0``, including causal attention with
``L != S`` (bottom-right) and grouped-query heads without copies. Inputs are validated here,
before any kernel is compiled or launched.
"""

from __future__ import annotations

import math
import os

import torch

from .ops import triton_attention_fwd

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise TypeError(
            f"{name}: the Triton kernel takes float16, bfloat16 or float32, got {t.dtype}"
        )
    return t


def _check_device(device: torch.device) -> None:
    if device.type == "cuda":
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


def _kv_heads(name: str, t: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``[B, S, D]`` (shared by all heads) -> ``[B, 1, S, D]``; checks batch and head counts."""
    if t.dim() == 3:
        t = t.unsqueeze(1)
    elif t.dim() != 4:
        raise ValueError(f"{name} must be [B, S, D] or [B, Hkv, S, D], got {tuple(t.shape)}")
    if t.shape[0] != query.shape[0]:
        raise ValueError(f"{name} batch {t.shape[0]} != query batch {query.shape[0]}")
    heads = query.shape[1]
    if t.shape[1] == 0 or heads % t.shape[1]:
        raise ValueError(f"{name}: {t.shape[1]} key/value heads do not divide {heads} query heads")
    return t


def _n_rows(n: float | torch.Tensor | None, query: torch.Tensor) -> torch.Tensor:
    """``n`` as ``[B, H, L]`` float32 on the query's device (differentiable in a tensor ``n``)."""
    b, h, n_q = query.shape[:3]
    if n is None:
        n = 0.0
    if isinstance(n, torch.Tensor):
        if not (n.is_floating_point() or n.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"softmax_n_param must be a float tensor, got {n.dtype}")
        try:
            rows = torch.broadcast_to(n, (b, h, n_q, 1))
        except RuntimeError as e:
            raise ValueError(
                f"softmax_n_param of shape {tuple(n.shape)} does not broadcast to "
                f"[B, H, L, 1] = {[b, h, n_q, 1]}"
            ) from e
        rows = rows[..., 0].to(query.device, torch.float32)
        if rows.device.type != "cpu":  # checked on the device without a host sync
            torch._assert_async(torch.all(rows >= 0), "softmax_n needs n >= 0")
        elif not torch.compiler.is_compiling() and not bool(torch.all(rows >= 0)):
            raise ValueError("softmax_n needs n >= 0 (and not NaN)")
        return rows.contiguous()
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        raise TypeError(f"softmax_n_param must be a float or a tensor, got {type(n).__name__}")
    n = float(n)
    if not n >= 0:
        raise ValueError(f"softmax_n needs n >= 0, got {n}")
    return torch.full((b, h, n_q), n, device=query.device, dtype=torch.float32)


def flash_attention_n_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    softmax_n_param: float | torch.Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """Attention with ``softmax_n`` weights ``exp(s_ij) / (n + sum_j exp(s_ij))`` in one fused
    Triton kernel, forward and backward (gradients for query, key, value and a tensor ``n``).

    Args:
        query: ``[B, H, L, D]``, float16, bfloat16 or float32, ``D <= 256``.
        key, value: ``[B, Hkv, S, D]`` with ``H % Hkv == 0`` (grouped-query) or ``[B, S, D]``
            (shared by all heads); the query's dtype and device. Any strides.
        softmax_n_param: ``n >= 0``: ``None``/0 (plain softmax), a float, or a tensor
            broadcastable to ``[B, H, L, 1]`` (e.g. ``[H, 1, 1]``, one learnable value per head).
        scale: score scale (default ``1/sqrt(D)``).
        is_causal: query ``i`` sees keys ``j <= i + S - L`` (aligned bottom-right when ``L != S``).

    Returns:
        ``[B, H, L, D]`` in the query's dtype. A row that sees no key is 0 for ``n > 0`` (NaN for
        ``n = 0``, as softmax over nothing).

    Raises:
        TypeError: non-tensor inputs, unsupported or mixed dtypes.
        ValueError: bad shapes, mixed devices, ``n < 0``, or a device the kernel cannot run on
            (CUDA; CPU only under ``TRITON_INTERPRET=1``).
    """
    query = _check_tensor("query", query)
    key = _check_tensor("key", key)
    value = _check_tensor("value", value)
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(
            f"query, key and value need one dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if query.dim() != 4:
        raise ValueError(f"query must be [B, H, L, D], got shape {tuple(query.shape)}")
    if not query.device == key.device == value.device:
        raise ValueError(
            f"query, key and value must be on one device, got {query.device}, {key.device}, "
            f"{value.device}"
        )
    key, value = _kv_heads("key", key, query), _kv_heads("value", value, query)
    d = query.shape[-1]
    if key.shape[-1] != d or value.shape[-1] != d:
        raise ValueError(
            f"query, key and value need one head dim, got {d}, {key.shape[-1]}, {value.shape[-1]}"
        )
    if not 0 < d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}], got {d}")
    if key.shape[1:3] != value.shape[1:3]:
        raise ValueError(
            f"key {tuple(key.shape)} and value {tuple(value.shape)} need the same heads and length"
        )
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    n_rows = _n_rows(softmax_n_param, query)
    _check_device(query.device)
    return triton_attention_fwd(query, key, value, n_rows, bool(is_causal), scale)[0]


__all__ = ["MAX_HEAD_DIM", "flash_attention_n_triton"]
