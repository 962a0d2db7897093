"""Block-aligned tiles over an expert-sorted selection, computed on the device without syncs.

The sorted positions ``0..N-1`` are grouped into runs of equal expert. Each run is cut into tiles
of ``block_m`` positions; a tile never straddles two experts, so every tile multiplies by one
matrix. The number of tiles is data dependent, but it is at most ``cdiv(N, block_m) + E``, so the
kernels are launched on that bound and the surplus tiles exit at once (``tile_expert == -1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ExpertLayout:
    """Where each expert's rows are in the sorted order, and the tiles over them.

    Attributes:
        expert_start: ``[E]`` first sorted position of each expert (int32).
        expert_end: ``[E]`` one past the last sorted position of each expert (int32).
        tile_expert: ``[max_tiles]`` expert of each tile, ``-1`` for surplus tiles (int32).
        tile_start: ``[max_tiles]`` first sorted position of each tile (int32).
    """

    expert_start: torch.Tensor
    expert_end: torch.Tensor
    tile_expert: torch.Tensor
    tile_start: torch.Tensor


def expert_layout(expert_sorted: torch.Tensor, n_experts: int, block_m: int) -> ExpertLayout:
    """Tiles of ``block_m`` sorted positions, each inside one expert's run.

    Args:
        expert_sorted: ``[N]`` expert index of each sorted position, ascending.
        n_experts: ``E``, the number of matrices.
        block_m: tile height.
    """
    device = expert_sorted.device
    n = expert_sorted.numel()
    counts = torch.bincount(expert_sorted, minlength=n_experts)[:n_experts]
    expert_end = torch.cumsum(counts, 0)
    expert_start = expert_end - counts
    tiles = (counts + block_m - 1) // block_m
    tiles_end = torch.cumsum(tiles, 0)
    max_tiles = (n + block_m - 1) // block_m + n_experts
    tile_ids = torch.arange(max_tiles, device=device)
    tile_expert = torch.searchsorted(tiles_end, tile_ids, right=True)
    valid = tile_expert < n_experts
    safe_expert = tile_expert.clamp_max(max(n_experts - 1, 0))
    first_tile = tiles_end[safe_expert] - tiles[safe_expert] if n_experts else tile_ids
    tile_start = (
        expert_start[safe_expert] + (tile_ids - first_tile) * block_m if n_experts else tile_ids
    )
    return ExpertLayout(
        expert_start=expert_start.to(torch.int32),
        expert_end=expert_end.to(torch.int32),
        tile_expert=torch.where(valid, tile_expert, -1).to(torch.int32),
        tile_start=torch.where(valid, tile_start, 0).to(torch.int32),
    )
