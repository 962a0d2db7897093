"""Where each expert's rows are in an expert-sorted selection, found on the device.

The sorted positions ``0..N-1`` are grouped into runs of equal expert. ``expert_bounds`` (a binary
search: one launch, no host sync) gives each run's start and end. The Triton forward cuts each
run into tiles of ``BLOCK_M`` positions, so that a tile never straddles two experts; the number
of tiles is data dependent but at most ``cdiv(N, BLOCK_M) + E``, so the kernel is launched on
that bound and each program finds its tile from the bounds (surplus programs exit at once).
"""

from __future__ import annotations

import torch

# The Triton tile search keeps one vector entry per expert: the most matrices it handles.
MAX_EXPERTS_TRITON = 16383


def expert_bounds(expert_sorted: torch.Tensor, n_experts: int) -> torch.Tensor:
    """``[E + 1]`` int32: expert ``e`` owns sorted positions ``bounds[e]:bounds[e + 1]``.

    Args:
        expert_sorted: ``[N]`` expert index of each sorted position, ascending.
        n_experts: ``E``, the number of matrices.
    """
    edges = torch.arange(n_experts + 1, device=expert_sorted.device, dtype=expert_sorted.dtype)
    return torch.searchsorted(expert_sorted, edges).to(torch.int32)
