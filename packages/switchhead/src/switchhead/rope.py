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

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Rotate ``x``: ``[..., T, d_head]`` where row ``t`` is at position ``offset + t``."""
        if self.n_rotate == 0:
            return x
        # Angles in float32 (float64 for float64 inputs), whatever the autocast dtype.
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        channels = torch.arange(0, self.n_rotate, 2, device=x.device, dtype=dtype)
        inv_freq = self.base ** (-channels / self.n_rotate)
        positions = torch.arange(offset, offset + x.shape[-2], device=x.device, dtype=dtype)
        angles = torch.outer(positions, inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        rot, rest = x[..., : self.n_rotate], x[..., self.n_rotate :]
        half = self.n_rotate // 2
        rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        return torch.cat([rot * cos + rotated_half * sin, rest], dim=-1)
