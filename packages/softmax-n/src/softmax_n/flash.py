"""``flash_attention_n`` and ``flash_attention_n_triton``: softmax_n attention at the speed of a
fused attention kernel.

With ``lse`` the row log-sum-exp of the scaled, biased scores and ``out0`` ordinary attention,
``out_n = out0 * sigmoid(lse - log n)``; the exact backward is the fused kernel's own backward
run with ``out_n`` and ``lse_n = logaddexp(lse, log n)`` (see ``fused.py``), so softmax_n costs
one in-place product over the output.

Kernels (``backend="auto"``):

- CPU: PyTorch's CPU flash kernel (any float dtype, masks, biases).
- CUDA, no mask/bias, fp16/bf16: cuDNN attention when PyTorch can use it, else PyTorch's flash
  kernel; causal with ``L != S`` (bottom-right) goes to the Triton kernel.
- CUDA with a mask or bias (or fp32): PyTorch's memory-efficient kernel.
- Otherwise (dropout, a bias that needs a gradient, exotic shapes): ``slow_attention_n``.

Fully masked rows: 0 for ``n > 0``; NaN for ``n = 0`` (as softmax over no entries).
"""

from __future__ import annotations

import math
import os

import torch

from . import fused
from .functional import _expand_kv, attention_bias, slow_attention_n
from .ops import attention_fwd

BACKENDS = ("auto", "torch", "triton", "reference")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compiling() -> bool:
    return hasattr(torch, "compiler") and torch.compiler.is_compiling()


def _check_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    if query.dim() != 4:
        raise ValueError(f"query must be [B, H, L, D], got shape {tuple(query.shape)}")
    for name, t in (("key", key), ("value", value)):
        if t.dim() not in (3, 4):
            raise ValueError(f"{name} must be [B, S, D] or [B, Hkv, S, D], got {tuple(t.shape)}")
        if t.shape[0] != query.shape[0]:
            raise ValueError(f"{name} batch {t.shape[0]} != query batch {query.shape[0]}")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key head dim {key.shape[-1]} != query head dim {query.shape[-1]}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key length {key.shape[-2]} != value length {value.shape[-2]}")
    if not query.device == key.device == value.device:
        raise ValueError("query, key and value must be on one device")
    if not query.dtype == key.dtype == value.dtype or query.dtype not in _FLOATS:
        raise ValueError(
            f"query, key, value need one floating dtype, got {query.dtype}, {key.dtype}, "
            f"{value.dtype}"
        )


def _n_rows(n: float | torch.Tensor | None, query: torch.Tensor) -> torch.Tensor:
    """``n`` broadcast to ``[B, H, L]`` in float32 (differentiable in a tensor ``n``)."""
    b, h, n_q = query.shape[:3]
    if n is None:
        n = 0.0
    if isinstance(n, torch.Tensor):
        if not _compiling() and bool((n < 0).any()):
            raise ValueError("softmax_n needs n >= 0")
        try:
            n = torch.broadcast_to(n, (b, h, n_q, 1))
        except RuntimeError as e:
            raise ValueError(
                f"softmax_n_param of shape {tuple(n.shape)} does not broadcast to "
                f"[B, H, L, 1] = {[b, h, n_q, 1]}"
            ) from e
        return n[..., 0].to(query.device, torch.float32).contiguous()
    n = float(n)
    if n < 0 or math.isnan(n):
        raise ValueError(f"softmax_n needs n >= 0, got {n}")
    return torch.full((b, h, n_q), n, device=query.device, dtype=torch.float32)


def _triton_ok(query: torch.Tensor) -> bool:
    if query.device.type == "cuda":
        return True
    return query.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _check_triton(query: torch.Tensor, value: torch.Tensor) -> None:
    if not _triton_ok(query):
        raise ValueError(
            f"the Triton kernel needs CUDA tensors (got {query.device.type}); set "
            "TRITON_INTERPRET=1 before importing triton to run it on CPU"
        )
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton kernel takes fp16, bf16 or fp32, got {query.dtype}")
    if value.shape[-1] != query.shape[-1] or query.shape[-1] > 256:
        raise ValueError(
            "the Triton kernel needs equal query/value head dims <= 256, got "
            f"{query.shape[-1]} and {value.shape[-1]}"
        )


def _kv_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, S, D]`` -> ``[B, 1, S, D]``; checks that the key/value heads divide ``heads``."""
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if t.shape[1] == 0 or heads % t.shape[1]:
        raise ValueError(f"{t.shape[1]} key/value heads do not divide {heads} query heads")
    return t


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
    backend: str = "auto",
) -> torch.Tensor:
    """Attention with softmax_n for any real ``n >= 0`` (see the module docstring).

    Args:
        query: ``[B, H, L, D]``; key, value: ``[B, H or Hkv, S, D]`` (grouped-query) or
            ``[B, S, D]`` (shared by all heads).
        softmax_n_param: ``n``: ``None``/0 (softmax), a float, or a tensor broadcastable to
            ``[B, H, L, 1]`` (e.g. ``[H, 1, 1]`` per head, learnable).
        scale: score scale (default ``1/sqrt(D)``).
        dropout_p: attention dropout (computed by the reference path).
        attn_mask: SDPA convention (bool True = keep, or float added), broadcastable to
            ``[B, H, L, S]``.
        attn_bias: additive float bias, e.g. ALiBi ``[H, L, S]``.
        is_causal: query ``i`` sees keys ``<= i + S - L`` (bottom-right aligned).
        backend: ``"auto"``, ``"torch"`` (PyTorch's fused kernels), ``"triton"`` (the fused
            Triton kernel; no mask/bias) or ``"reference"`` (``slow_attention_n``).

    Returns:
        ``[B, H, L, Dv]`` in the query's dtype.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check_inputs(query, key, value)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    heads = query.shape[1]
    key, value = _kv_heads(key, heads), _kv_heads(value, heads)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    has_bias = attn_mask is not None or attn_bias is not None
    bias_grad = any(t is not None and t.requires_grad for t in (attn_mask, attn_bias))
    reference = backend == "reference" or dropout_p > 0 or bias_grad
    if backend == "triton":
        _check_triton(query, value)
        if has_bias:
            raise ValueError("the Triton kernel takes no attn_mask/attn_bias; use backend='torch'")
        if reference:
            raise ValueError("the Triton kernel has no dropout; use backend='reference'")
    if reference:
        return slow_attention_n(
            query, key, value, attn_mask, dropout_p, is_causal, scale, softmax_n_param,
            attn_bias=attn_bias,
        )  # fmt: skip
    n_rows = _n_rows(softmax_n_param, query)
    n_q, n_k = query.shape[-2], key.shape[-2]
    use_triton = backend == "triton" or (
        backend == "auto"
        and not has_bias
        and query.device.type == "cuda"
        and is_causal
        and n_q != n_k
        and query.dtype != torch.float64
        and value.shape[-1] == query.shape[-1] <= 256
    )
    if use_triton:
        return attention_fwd(query, key, value, n_rows, None, is_causal, scale, "triton")[0]
    k_full, v_full = _expand_kv(key, query), _expand_kv(value, query)
    kernel_causal = is_causal and n_q == n_k and not has_bias
    bias = None
    if (is_causal and not kernel_causal) or has_bias:
        bias = attention_bias(n_q, n_k, attn_mask, attn_bias, is_causal, query.device, query.dtype)
        bias = bias.expand(query.shape[0], heads, n_q, n_k)
    q, k, v = query.contiguous(), k_full.contiguous(), v_full.contiguous()
    kernel = fused.pick_kernel(q, k, v, bias is not None, kernel_causal, _compiling())
    if kernel is None:
        if backend == "torch":
            raise ValueError(
                f"no fused PyTorch kernel takes these inputs ({query.device.type}, "
                f"{query.dtype}, head dims {query.shape[-1]}/{value.shape[-1]})"
            )
        triton_fits = value.shape[-1] == query.shape[-1] <= 256 and query.dtype != torch.float64
        if not has_bias and triton_fits and _triton_ok(query):
            return attention_fwd(query, key, value, n_rows, None, is_causal, scale, "triton")[0]
        return slow_attention_n(
            query, key, value, attn_mask, 0.0, is_causal, scale, softmax_n_param,
            attn_bias=attn_bias,
        )  # fmt: skip
    return attention_fwd(q, k, v, n_rows, bias, kernel_causal, scale, kernel)[0]


def flash_attention_n_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    is_causal: bool = False,
    scale: float | None = None,
    softmax_n_param: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused Triton kernel (upstream's argument order): ``query [B, H, L, D]``, ``key``,
    ``value`` ``[B, Hkv, S, D]`` or ``[B, S, D]``, fp16/bf16/fp32, ``D <= 256``; ``n`` a float or
    a tensor broadcastable to ``[B, H, L, 1]``. Causal is bottom-right aligned. Runs on CUDA, or on
    CPU under ``TRITON_INTERPRET=1``. Returns ``[B, H, L, D]``."""
    return flash_attention_n(
        query, key, value, softmax_n_param, scale, is_causal=is_causal, backend="triton"
    )


def softmax_n_attention_fn(n: float | torch.Tensor, backend: str = "auto"):
    """An attention core with SDPA's signature for ``attention_fn`` hooks (SwitchHead, MoEUT,
    CoLT5): ``fn(q, k, v, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0)``, with
    ``attn_mask`` in SDPA's convention (bool True = keep, or float added)."""

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
            backend=backend,
        )

    return attention
