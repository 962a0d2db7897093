"""The routing of a ``moe_linear`` call by pairs of experts (``pair_triton.build_pair_routing``)
against its definition: slots stably sorted by expert, items stably sorted by pair number, and
the pairs' tile table."""

from __future__ import annotations

import pytest
import torch

from testing_support import TRITON_CUDA, TRITON_INTERPRET


@pytest.mark.parametrize(("backend", "device"), [TRITON_INTERPRET, TRITON_CUDA])
@pytest.mark.parametrize(
    ("n_experts", "n_items", "twice"),
    [
        (8, 300, False),  # several blocks of items and several tiles per pair
        (5, 77, True),  # groups that chose one expert twice (lo == hi)
        (1, 5, True),  # one expert: every item on the diagonal
        (50, 1000, False),  # 1275 pair numbers: counts by stores, not a histogram
        (3, 0, False),  # no items
    ],
)
def test_pair_routing_matches_definition(backend, device, n_experts, n_items, twice):
    from cvmm_kernel.pair_triton import build_pair_routing

    g = torch.Generator().manual_seed(3)
    if twice or n_items == 0:
        index = torch.randint(0, n_experts, (n_items, 2), generator=g)
    else:
        index = torch.stack([torch.randperm(n_experts, generator=g)[:2] for _ in range(n_items)])
    index[: n_items // 3] = torch.tensor([1, 0]) if n_experts > 1 else 0  # one crowded pair
    flat = index.reshape(-1)
    block_m = 16
    routing = build_pair_routing(flat.to(device), n_experts, block_m)
    s2s, slot_to_sorted, offsets, tile_pair, tile_start, n_valid, s2i, pair_offsets = (
        t.cpu().long() for t in routing
    )
    # the slots, stably by expert within partner: a permutation grouped by expert
    assert torch.equal(flat[s2s], torch.sort(flat).values)
    assert torch.equal(torch.sort(s2s).values, torch.arange(flat.numel()))
    assert torch.equal(slot_to_sorted[s2s], torch.arange(flat.numel()))
    counts = torch.bincount(flat, minlength=n_experts)
    assert offsets.tolist() == [0, *torch.cumsum(counts, 0).tolist()]
    # the items, stably by pair number
    lo, hi = index.min(1).values, index.max(1).values
    pair = hi * (hi + 1) // 2 + lo
    n_pairs = n_experts * (n_experts + 1) // 2
    assert torch.equal(s2i, torch.sort(pair, stable=True).indices)
    pair_counts = torch.bincount(pair, minlength=n_pairs)
    assert pair_offsets.tolist() == [0, *torch.cumsum(pair_counts, 0).tolist()]
    # the tile table: each pair's items in tiles of block_m, pairs in order, padding after
    expected = [
        (p, int(pair_offsets[p]) + t * block_m)
        for p in range(n_pairs)
        for t in range(-(-int(pair_counts[p]) // block_m))
    ]
    assert int(n_valid) == len(expected)
    assert list(zip(tile_pair.tolist(), tile_start.tolist()))[: len(expected)] == expected
    assert all(p == n_pairs for p in tile_pair[len(expected) :].tolist())
