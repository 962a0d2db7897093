"""Rotary position embedding on the first ``n_rotate`` channels of each head."""

from __future__ import annotations

import torch


class RotaryEmbedding(torch.nn.Module):
    """RoPE with the "rotate half" pairing (channel ``c`` with ``c + n/2``).

    Args:
        n_rotate: rotated channels per head (even; the rest pass through unchanged).
        base: frequency base.
    """

    def __init__(self, n_rotate: int, base: float = 10000.0):
        super().__init__()
        if n_rotate % 2:
            raise ValueError(f"n_rotate must be even, got {n_rotate}")
        self.n_rotate = n_rotate
        self.base = base
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _cos_sin(self, end: int, device: torch.device, dtype: torch.dtype):
        """cos/sin tables ``[L, n_rotate]`` for positions ``0..L-1`` with ``L >= end``, cached
        per device and dtype (grown by doubling), computed in float32 (float64 for float64)."""
        key = (device, dtype)
        cached = self._tables.get(key)
        if cached is not None and cached[0].shape[0] >= end and not torch.compiler.is_compiling():
            return cached
        length = max(end, 2 * cached[0].shape[0] if cached is not None else 0)
        work = torch.float64 if dtype == torch.float64 else torch.float32
        channels = torch.arange(0, self.n_rotate, 2, device=device, dtype=work)
        inv_freq = self.base ** (-channels / self.n_rotate)
        angles = torch.outer(torch.arange(length, device=device, dtype=work), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        tables = (angles.cos().to(dtype), angles.sin().to(dtype))
        if not torch.compiler.is_compiling():
            self._tables[key] = tables
        return tables

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Rotate ``x``: ``[..., T, d_head]`` where row ``t`` is at position ``offset + t``."""
        if self.n_rotate == 0:
            return x
        cos, sin = self._cos_sin(offset + x.shape[-2], x.device, x.dtype)
        cos = cos[offset : offset + x.shape[-2]]
        sin = sin[offset : offset + x.shape[-2]]
        rot, rest = x[..., : self.n_rotate], x[..., self.n_rotate :]
        half = self.n_rotate // 2
        rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        return torch.cat([rot * cos + rotated_half * sin, rest], dim=-1)
