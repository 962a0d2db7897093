"""Test helpers: softmax_n attention written out directly in float64 (the oracle of the tests)."""

from __future__ import annotations

import math

import torch


def direct_attention_n(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n: float | torch.Tensor = 0.0,
    keep: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    *,
    sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(e / (n + sum e)) @ v`` with ``e = exp(q k^T * scale + bias)`` masked by ``keep`` (True =
    attend) and by bottom-right causality; ``q [B, H, L, D]``, ``k [B, H, S, D]``,
    ``v [B, H, S, Dv]``; float64. Rows that see no key (with ``n = 0``) give 0.

    ``k``/``v`` may also have fewer heads ``Hkv`` (grouped-query attention: each repeated to
    ``H / Hkv`` query heads) or be ``[B, S, D]`` (shared by every head). ``sink`` (``[H]``, one
    logit per head, as gpt-oss's attention sinks; exclusive with ``n``) is an extra column of the
    softmax that is then dropped, ``softmax([scores, sink[h]])[..., :-1] @ v``, i.e.
    ``n = exp(sink)`` per head, computed in log space so that large sinks and scores stay exact.
    """
    q, k, v = q.double(), k.double(), v.double()
    if k.dim() == 3:
        k, v = k[:, None], v[:, None]
    if k.shape[1] not in (1, q.shape[1]):
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.double()
    if causal:
        n_q, n_k = s.shape[-2:]
        allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=s.device).tril(n_k - n_q)
        keep = allowed if keep is None else keep & allowed
    if sink is not None:
        if isinstance(n, torch.Tensor) or n != 0:
            raise ValueError("direct_attention_n: sink and n are mutually exclusive")
        if keep is not None:
            s = s.masked_fill(~keep, -math.inf)
        column = sink.double().view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        return torch.softmax(torch.cat([s, column], -1), -1)[..., :-1] @ v
    e = s.exp()
    if keep is not None:
        e = e.masked_fill(~keep, 0.0)
    n = n.double() if isinstance(n, torch.Tensor) else n
    den = n + e.sum(-1, keepdim=True)
    return (e / torch.where(den == 0, 1.0, den)) @ v  # a row that sees no key is 0 (as SDPA)
