"""A pre-LayerNorm self-attention block with a residual connection around SwitchHead."""

from __future__ import annotations

import torch

from .attention import KVCache, SwitchHeadRope
from .masks import AttentionMask


class SwitchHeadSelfAttention(torch.nn.Module):
    """``x + attention(LayerNorm(x))`` with ``attention = SwitchHeadRope(d_model, ...)``.

    Args:
        d_model: model width; other keyword arguments go to the attention class.
        attention: ``SwitchHeadRope`` (default) or ``SwitchHeadXL``.
    """

    def __init__(self, d_model: int, *args, attention: type = SwitchHeadRope, **kwargs):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d_model)
        self.attention = attention(d_model, *args, **kwargs)

    def forward(
        self, x: torch.Tensor, mask: AttentionMask | None = None, kv_cache: KVCache = None
    ) -> tuple[torch.Tensor, KVCache]:
        """``x``: ``[B, T, d_model]``; returns the same shape and the cache."""
        h = self.norm(x)
        out, kv_cache = self.attention(h, h, h, mask=mask, kv_cache=kv_cache)
        return x + out, kv_cache
