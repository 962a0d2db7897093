"""Windowed (local) multi-head attention on PyTorch's fused SDPA, blocked by window."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rotary import apply_rotary, rotary_angles
from .router import check_token_mask, check_tokens

__all__ = ["LocalMHA", "local_attention"]


def local_attention(
    q: Tensor, k: Tensor, v: Tensor, window_size: int, causal: bool = False,
    mask: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Attention of ``q, k, v [b, h, n, d]`` where query block ``i`` (of ``window_size`` tokens)
    sees key blocks ``i - 1, i`` and, unless ``causal``, ``i + 1``; causal also hides later keys.
    ``mask [b, n]``: ``True`` = real token. Returns ``[b, h, n, d]``; queries with no visible key
    give 0."""
    b, h, n, d = q.shape
    w = window_size
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise ValueError(f"window_size must be a positive int, got {w!r}")
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = real token), got {mask.dtype}")
    if mask is not None and mask.shape != (b, n):
        raise ValueError(f"mask must have shape {(b, n)}, got {tuple(mask.shape)}")
    if b == 0 or n == 0:
        return v.new_zeros(v.shape)
    pad = (-n) % w
    keep = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=q.device)
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        keep = F.pad(keep, (0, pad), value=False)
    nb = (n + pad) // w
    look = 1 if causal else 2  # blocks after the previous one

    def windows(t: Tensor, fill) -> Tensor:
        t = t.reshape(*t.shape[:2], nb, w, *t.shape[3:]) if t.ndim == 4 else t.view(b, nb, w)
        dim = 2 if t.ndim == 5 else 1
        padded = F.pad(t, (0, 0, 0, 0, 1, 1) if t.ndim == 5 else (0, 0, 1, 1), value=fill)
        return torch.cat([padded.narrow(dim, i, nb) for i in range(look + 1)], dim=dim + 1)

    kw, vw = windows(k, 0.0), windows(v, 0.0)  # [b, h, nb, (look+1) w, d]
    keep_w = windows(keep, False)  # [b, nb, (look+1) w]
    attn_mask = keep_w[:, None, :, None, :].expand(b, 1, nb, w, keep_w.shape[-1])
    if causal:
        qpos = torch.arange(w, device=q.device)[:, None] + w
        kpos = torch.arange(2 * w, device=q.device)[None, :]
        attn_mask = attn_mask & (kpos <= qpos)
    qw = q.reshape(b, h, nb, w, d).transpose(1, 2).reshape(b * nb, h, w, d)
    kw = kw.transpose(1, 2).reshape(b * nb, h, -1, d)
    vw = vw.transpose(1, 2).reshape(b * nb, h, -1, d)
    attn_mask = attn_mask.reshape(b * nb, 1, w, -1)
    any_key = attn_mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=attn_mask | ~any_key)
    out = out * any_key
    out = out.reshape(b, nb, h, w, d).transpose(1, 2).reshape(b, h, nb * w, d)
    return out[:, :, :n]


class LocalMHA(nn.Module):
    """Pre-norm windowed multi-head attention ``[b, n, dim] -> [b, n, dim]`` (the light branch).
    ``use_rotary`` applies rotary positional embeddings to queries and keys (by absolute token
    position, so a query sees its keys at their true relative offsets), as the ``LocalMHA`` of
    lucidrains' ``local-attention`` does by default."""

    def __init__(
        self, dim: int, window_size: int, dim_head: int = 64, heads: int = 8,
        causal: bool = False, use_rotary: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.window_size, self.heads, self.causal = window_size, heads, causal
        self.dim, self.dim_head, self.use_rotary = dim, dim_head, use_rotary
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        check_tokens(x, self.dim)
        check_token_mask(mask, x)
        b, n, _ = x.shape
        qkv = self.to_qkv(self.norm(x)).view(b, n, 3, self.heads, self.dim_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        if self.use_rotary:
            pos = torch.arange(n, device=x.device)
            angles = rotary_angles(pos, self.dim_head, q.dtype)
            q, k = apply_rotary(q, angles), apply_rotary(k, angles)
        out = local_attention(q, k, v, self.window_size, causal=self.causal, mask=mask)
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))
