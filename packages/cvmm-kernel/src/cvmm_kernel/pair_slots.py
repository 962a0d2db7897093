"""``moe_linear``'s slot sums by *pairs* of experts, where each group chose two.

A routed linear layer sums per-slot products ``g_s * a[s // a_div] @ W[e_s]`` into output rows
of ``out_div`` slots (see :mod:`cvmm_kernel.linear_ops`). The sparse kernels write one product
row per slot and sum them afterwards: a memory-bound round trip over ``[N, d_out]``. Where a
group's ``k = 2`` slots read the same input row and land in the same output row (``a_div`` and
``out_div`` both even), an *item* (the two slots ``2i``, ``2i + 1``) needs only

    ``y[i] = g_{2i} * a[i // (a_div / 2)] @ W[e_{2i}] + g_{2i+1} * a[...] @ W[e_{2i+1}]``,

one product row per item: half the rows to write and to sum. The items are sorted by their
pair of experts (number ``hi * (hi + 1) / 2 + lo``, ``lo <= hi``) with the slots' routing
kernels, and one program per (pair, column block) loads its two weight blocks once and walks the
pair's items: a pair has a few hundred items, so the weights would otherwise be read again for
every tile of rows. SwitchHead's 4 heads x 8 experts (2 chosen per head) make 112 pairs: its value
projection's input gradient and its output projection's forward take this path.
"""

from __future__ import annotations

import torch

# ENABLED[0] = False: per-slot products and their sum everywhere (benchmarks/ab_pair_slots.py
# compares the two in one process). Read at each call.
ENABLED = [True]
# The most experts whose pairs (E * (E + 1) / 2 numbers) the routing bins: above it, per-slot
# products.
MAX_EXPERTS = 64


def wanted(n_experts: int, k: int) -> bool:
    """Whether a call with ``k`` experts per group over ``n_experts`` takes pairs where its
    sums allow (decided once per call: its backward follows its forward)."""
    return ENABLED[0] and k == 2 and n_experts <= MAX_EXPERTS


def fits(a_div: int, out_div: int, width: int) -> bool:
    """Whether a slot sum (input row ``s // a_div``, output row ``s // out_div``, inner size
    ``width``) can run by pairs: both slots of an item in one input row and one output row, and
    ``width`` within the row-tile kernel's inner size."""
    from .moe_triton import ROWS_MAX_K

    return a_div % 2 == 0 and out_div % 2 == 0 and width <= ROWS_MAX_K


def pair_sums(a: torch.Tensor, w: torch.Tensor, index: torch.Tensor, gate: torch.Tensor,
              a_div: int, out_div: int, config: tuple) -> torch.Tensor:  # fmt: skip
    """``[N // out_div, d_out]`` in ``a``'s dtype: ``out[o] = sum_{s: s // out_div = o} g_s *
    a[s // a_div] @ w[index[s]]`` by items (products of two slots, then a fixed-order fp32 sum of
    ``out_div / 2`` items per row: deterministic). ``config``: the kernel's ``(BLOCK_N,
    BLOCK_M, num_warps, num_stages)``."""
    from . import moe_triton as kt

    n_experts = w.shape[0]
    n_pairs = n_experts * (n_experts + 1) // 2
    # the items sorted by pair and each pair's offsets (no tile table: the kernel walks pairs)
    to_item, _to_sorted, offsets, *_tiles = kt.build_routing(kt.pair_numbers(index), n_pairs, 16, 0)
    items = a.new_empty(index.numel() // 2, w.shape[2])
    kt.pair_rows(a, w, items, index, gate, to_item, offsets, a_div // 2, config)
    if out_div == 2:
        return items
    return kt.gated_group_sum(items, None, out_div // 2)
