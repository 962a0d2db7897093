"""softmax_n and the plain-PyTorch reference attention.

``softmax_n(x)_i = exp(x_i) / (n + sum_j exp(x_j))``: with ``n > 0`` a row may put (almost) no
weight anywhere ("attention is off by one"). It equals the softmax over ``x`` extended by one
extra logit ``log n``, with that extra entry dropped, which is how it is computed here: stable
for any real ``n >= 0`` and any logits, with exact gradients from autograd.
"""

from __future__ import annotations

import math

import torch


def _log_n(n: float | torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | float:
    if n is None:
        return -math.inf
    if isinstance(n, torch.Tensor):
        if n.device.type != "cpu":  # checked on the device without a host sync (raises later)
            torch._assert_async(torch.all(n >= 0), "softmax_n needs n >= 0")
        elif not torch.compiler.is_compiling() and bool(torch.any(n < 0)):
            raise ValueError("softmax_n needs n >= 0")
        return torch.log(n.to(like.device, torch.promote_types(n.dtype, torch.float32)))
    if n < 0:
        raise ValueError(f"softmax_n needs n >= 0, got {n}")
    return math.log(n) if n > 0 else -math.inf


def softmax_n(
    x: torch.Tensor,
    n: float | torch.Tensor | None = None,
    dim: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``exp(x_i) / (n + sum_j exp(x_j))`` along ``dim`` (default -1).

    Args:
        x: logits, any shape.
        n: ``None``/0 (plain softmax), a float ``>= 0``, or a tensor broadcastable to ``x`` with the
            reduced dim of size 1 (e.g. one learnable value per head).
        dtype: compute (and return) in this dtype.

    A row of ``-inf`` logits gives zeros for ``n > 0`` (NaN for ``n = 0``, as softmax does).
    """
    if dtype is not None:
        x = x.to(dtype)
    dim = -1 if dim is None else dim
    log_n = _log_n(n, x)
    lse = torch.logsumexp(x, dim=dim, keepdim=True)
    if isinstance(log_n, torch.Tensor):
        lse = torch.logaddexp(lse, log_n.to(lse.dtype))
    elif log_n != -math.inf:
        lse = torch.logaddexp(lse, torch.full_like(lse, log_n))
    return torch.exp(x - lse)


def _expand_kv(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Key/value ``[B, S, D]`` (shared by heads) or ``[B, Hkv, S, D]`` (grouped-query) to the
    query's heads."""
    if t.dim() == q.dim() - 1:
        t = t.unsqueeze(-3)
    heads, kv_heads = q.shape[-3], t.shape[-3]
    if kv_heads != heads:
        if kv_heads == 0 or heads % kv_heads:
            raise ValueError(f"{kv_heads} key/value heads do not divide {heads} query heads")
        if kv_heads == 1:
            t = t.expand(*t.shape[:-3], heads, *t.shape[-2:])
        else:
            t = t.repeat_interleave(heads // kv_heads, dim=-3)
    return t


def attention_bias(
    q_len: int,
    k_len: int,
    attn_mask: torch.Tensor | None,
    attn_bias: torch.Tensor | None,
    is_causal: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """One additive float bias from an SDPA-style mask (bool: True = keep; float: added), a bias
    (e.g. ALiBi) and causality, aligned bottom-right: query ``i`` sees keys ``<= i + S - L``."""
    bias = None
    if is_causal:
        keep = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
        bias = torch.zeros(q_len, k_len, device=device, dtype=dtype).masked_fill(~keep, -math.inf)
    for extra in (attn_mask, attn_bias):
        if extra is None:
            continue
        if extra.dtype == torch.bool:
            extra = torch.zeros(extra.shape, device=device, dtype=dtype).masked_fill(
                ~extra, -math.inf
            )
        bias = extra.to(dtype) if bias is None else bias + extra.to(dtype)
    return bias


def slow_attention_n(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    softmax_n_param: float | torch.Tensor | None = None,
    softmax_dtype: torch.dtype | None = None,
    train: bool = True,
    attn_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference attention with softmax_n, materialising the scores; never mutates its inputs.

    Args:
        query: ``[B, H, L, D]``; key, value: ``[B, H or Hkv, S, D]`` or ``[B, S, D]``.
        attn_mask: SDPA convention: bool (True = keep) or float (added to the scores).
        is_causal: bottom-right aligned when ``L != S``.
        softmax_n_param: ``n`` (float, or a tensor broadcastable to ``[B, H, L, 1]``).
        softmax_dtype: dtype of the softmax (default: the scores' dtype).
        train: dropout is applied only when ``train`` is true.
        attn_bias: additive bias, e.g. ALiBi.

    Returns:
        ``[B, H, L, Dv]``.
    """
    key, value = _expand_kv(key, query), _expand_kv(value, query)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale
    bias = attention_bias(
        query.shape[-2], key.shape[-2], attn_mask, attn_bias, is_causal, query.device, scores.dtype
    )
    if bias is not None:
        scores = scores + bias
    weights = softmax_n(scores, softmax_n_param, dim=-1, dtype=softmax_dtype).to(value.dtype)
    if dropout_p > 0 and train:
        weights = torch.nn.functional.dropout(weights, dropout_p)
    return weights @ value
