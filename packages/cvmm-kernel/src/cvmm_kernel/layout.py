"""Block-aligned tiles over an expert-sorted selection, computed on the device without syncs.

The sorted positions ``0..N-1`` are grouped into runs of equal expert. ``expert_bounds`` (from a
binary search, one launch, no host sync) gives each run's start and end. For the Triton forward
each run is cut into tiles of ``block_m`` positions; a tile never straddles two experts, so every
tile multiplies by one matrix. The number of tiles is data dependent, but it is at most
``cdiv(N, block_m) + E``, so the kernels are launched on that bound and the surplus tiles exit at
once (``tile_expert == -1``).
"""

from __future__ import annotations

import torch


def expert_bounds(expert_sorted: torch.Tensor, n_experts: int) -> torch.Tensor:
    """``[E + 1]`` int32: expert ``e`` owns sorted positions ``bounds[e]:bounds[e + 1]``.

    Args:
        expert_sorted: ``[N]`` expert index of each sorted position, ascending.
        n_experts: ``E``, the number of matrices.
    """
    edges = torch.arange(n_experts + 1, device=expert_sorted.device, dtype=expert_sorted.dtype)
    return torch.searchsorted(expert_sorted, edges).to(torch.int32)


def expert_tiles(
    bounds: torch.Tensor, n_positions: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles of ``block_m`` positions inside one expert's run each.

    Args:
        bounds: ``[E + 1]`` from :func:`expert_bounds`.
        n_positions: ``N``.
        block_m: tile height.

    Returns:
        ``tile_expert`` and ``tile_start``, int32 of length ``cdiv(N, block_m) + E``: the expert
        (``-1`` for surplus tiles) and first sorted position of each tile.
    """
    n_experts = bounds.numel() - 1
    starts = bounds[:-1].long()
    tiles = (bounds[1:].long() - starts + block_m - 1) // block_m
    tiles_end = torch.cumsum(tiles, 0)
    max_tiles = (n_positions + block_m - 1) // block_m + n_experts
    tile_ids = torch.arange(max_tiles, device=bounds.device)
    tile_expert = torch.searchsorted(tiles_end, tile_ids, right=True)
    valid = tile_expert < n_experts
    safe = tile_expert.clamp_max(max(n_experts - 1, 0))
    tile_start = starts[safe] + (tile_ids - (tiles_end[safe] - tiles[safe])) * block_m
    return (
        torch.where(valid, tile_expert, -1).to(torch.int32),
        torch.where(valid, tile_start, 0).to(torch.int32),
    )
