"""Rotary positional embeddings (Su et al. 2021) from token positions, with no parameters or
buffers (module state dicts and ``to_empty`` are unaffected)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["apply_rotary", "rotary_angles"]


def rotary_angles(
    positions: Tensor, dim: int, like: torch.dtype = torch.float32, theta: float = 10000.0
) -> Tensor:
    """Angles ``[..., dim - dim % 2]`` of integer ``positions [...]`` for heads of size ``dim``
    (the ``rotate_half`` layout of upstream's ``RotaryEmbedding``: frequencies repeated twice).
    float64 for ``like=torch.float64``, else float32."""
    rot = dim - dim % 2
    dtype = torch.float64 if like == torch.float64 else torch.float32
    inv_freq = theta ** -(torch.arange(0, rot, 2, device=positions.device, dtype=dtype) / rot)
    freqs = positions.to(dtype).unsqueeze(-1) * inv_freq
    return torch.cat([freqs, freqs], dim=-1)


def apply_rotary(t: Tensor, angles: Tensor) -> Tensor:
    """Rotate the first ``angles.shape[-1]`` channels of ``t [..., n, d]`` by ``angles`` (which
    broadcast to ``t[..., :rot]``); computed in at least float32, returned in ``t``'s dtype."""
    rot = angles.shape[-1]
    if rot == 0:
        return t
    dtype = torch.promote_types(t.dtype, angles.dtype)
    t_rot, t_pass = t[..., :rot].to(dtype), t[..., rot:]
    x1, x2 = t_rot.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    out = t_rot * angles.cos().to(dtype) + rotated * angles.sin().to(dtype)
    return torch.cat([out.to(t.dtype), t_pass], dim=-1)
