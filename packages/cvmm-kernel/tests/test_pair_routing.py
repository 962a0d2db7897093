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
    s2s, slot_to_sorted, offsets, tile_pair, tile_start, n_valid, lo_slot, pair_offsets = (
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
    by_pair = torch.sort(pair, stable=True).indices
    # each as the slot of its expert lo: the first slot where both chose one expert
    assert torch.equal(lo_slot, 2 * by_pair + (index[by_pair, 0] > index[by_pair, 1]))
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


@pytest.mark.parametrize(("backend", "device"), [TRITON_INTERPRET, TRITON_CUDA])
@pytest.mark.parametrize(("config", "n"), [((16, 16, 4, 2), 48), ((128, 64, 4, 3), 48),
                                         ((16, 16, 4, 2), 0)])  # fmt: skip
def test_pair_rows_extras_match_definition(backend, device, config, n):
    """The row-tile kernel's gate dots and gated rows in the experts' order (a program each per
    pair, after its column blocks: 48 columns in blocks of 16, one block, or no columns at all)
    against their definitions; the products unchanged by them, the same with the items' loads
    prefetched by hand or pipelined by Triton, and against their definition."""
    from cvmm_kernel import pair_slots
    from cvmm_kernel import pair_triton as pt

    g = torch.Generator().manual_seed(5)
    n_experts, n_items, k = 7, 203, 24
    index = torch.stack([torch.randperm(n_experts, generator=g)[:2] for _ in range(n_items)])
    index[::3] = torch.tensor([4, 2])  # one crowded pair: many tiles of its items
    flat = index.reshape(-1).to(device)
    gate = torch.rand(2 * n_items, generator=g).to(device)
    a = torch.randn(n_items, k, generator=g).to(device)
    w = torch.randn(n_experts, k, n, generator=g).to(device)
    products = torch.randn(2 * n_items, k, generator=g).to(device)
    routing = pair_slots.routing_impl(flat, n_experts, 16)
    plain, out = (torch.empty(n_items, n, device=device) for _ in range(2))
    dgate = torch.full((2 * n_items,), float("nan"), device=device)
    rows = torch.full((2 * n_items, k), float("nan"), device=device)
    pipelined = torch.empty_like(plain)
    pt.pair_rows(a, w, pipelined, flat, gate, routing[6], routing[7], 1, config, prefetch=False)
    pt.pair_rows(a, w, plain, flat, gate, routing[6], routing[7], 1, config)
    pt.pair_rows(a, w, out, flat, gate, routing[6], routing[7], 1, config, products=products,
                 dgate=dgate, sorted_rows=rows, slot_to_sorted=routing[1])  # fmt: skip
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    # the loads prefetched by hand or by Triton's pipeliner: fp32 products, rounded alike up to
    # the compiler's contractions of the gate's multiply-add
    torch.testing.assert_close(pipelined, plain, rtol=1e-6, atol=1e-6)
    if n:
        expected = sum(gate[j::2, None] * (a[:, None, :] @ w[flat[j::2]]).squeeze(1)
                       for j in range(2))  # fmt: skip
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    slot_rows = a.repeat_interleave(2, 0)
    torch.testing.assert_close(dgate, (products * slot_rows).sum(1), rtol=1e-5, atol=1e-5)
    s2s = routing[0].long()
    torch.testing.assert_close(rows, slot_rows[s2s] * gate[s2s][:, None], rtol=0, atol=0)


@pytest.mark.parametrize(("backend", "device"), [TRITON_INTERPRET, TRITON_CUDA])
@pytest.mark.parametrize("gated", [False, True])
def test_group_sum_eviction_keeps_the_sums(backend, device, gated, monkeypatch):
    """``gated_group_sum`` with its loads marked evict-first (shipped) or not: the same bits,
    and the sums of their definition (several column blocks and a part-filled last one, groups
    of 4 rows)."""
    from cvmm_kernel import moe_triton

    g = torch.Generator().manual_seed(8)
    y = torch.randn(4 * 37, 40, generator=g).to(device)
    gate = torch.rand(4 * 37, generator=g).to(device) if gated else None
    monkeypatch.setattr(moe_triton, "GROUP_SUM_EVICT", ["evict_first"])
    plain = moe_triton.gated_group_sum(y, gate, 4)
    monkeypatch.setattr(moe_triton, "GROUP_SUM_EVICT", [""])
    torch.testing.assert_close(moe_triton.gated_group_sum(y, gate, 4), plain, rtol=0, atol=0)
    weighted = y if gate is None else y * gate[:, None]
    torch.testing.assert_close(plain, weighted.view(37, 4, 40).sum(1), rtol=1e-5, atol=1e-5)
