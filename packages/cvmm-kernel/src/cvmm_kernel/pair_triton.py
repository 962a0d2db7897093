"""Triton kernels of the sums by pairs of experts (:mod:`cvmm_kernel.pair_slots`).

An *item* is a group's two slots ``2i``, ``2i + 1``; its *pair* is its two experts, numbered
``hi * (hi + 1) / 2 + lo`` (``lo <= hi``; ``E * (E + 1) / 2`` numbers).

- routing (:func:`build_pair_routing`, three launches, no sort and no host sync): the routing's
  rank and scan kernels (:mod:`cvmm_kernel.moe_triton`) over the items binned by pair, then
  ``_pair_place_kernel``, which places the items (sorted by pair, each as its slot of expert
  ``lo``, with the pairs' offsets and tile table) and, in the same launch, the slots sorted by
  expert for the weight gradient: expert ``e``'s slots come partner by partner (the other
  slot's expert ``j``), and within one partner in the pair's item order, so each slot's
  position follows from its item's rank in the pair.
- ``_pair_rows_kernel``: inner sizes up to ``ROWS_MAX_K``; one program per (pair, column block)
  loads both weight blocks once and walks the pair's items.
- ``_pair_gemm_kernel``: any inner size; one program per (tile of a pair's items, column block)
  accumulates both experts' products over ``K`` from one load of each row block; optionally
  stores each slot's ungated product (kept for the gate's gradient) or takes the gate's
  gradient against a row of ``h`` in its epilogue.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .host_math import cdiv, next_power_of_2
from .launcher import launch
from .moe_triton import (
    HISTOGRAM_MAX_BINS,
    MAX_BLOCK_COUNTS,
    ROUTING_BLOCK,
    ROUTING_SCAN,
    ROUTING_WARPS,
    ROWS_MAX_K,
    _fit,
    _int32_views,
    _offsets_and_tiles,
    _pair_number,
    _routing_rank_kernel,
    _routing_scan_kernel,
    _shared_memory_budget,
    _weight_block,
    input_precision,
    routing_outputs,
    weight_operand,
)
from .pdl import wait_for_previous
from .traced_ops import is_traced


@triton.jit
def _partner_counts(counts_ptr, E, BLOCK_E: tl.constexpr):
    """``[BLOCK_E, BLOCK_E]``: entry ``(e, j)`` the number of expert ``e``'s slots whose item's
    other slot chose ``j``, from the pairs' item counts (twice the count on the diagonal, where
    both slots of an item chose ``e``); zero outside ``E x E``."""
    e = tl.arange(0, BLOCK_E)
    lo = tl.minimum(e[:, None], e[None, :])
    hi = tl.maximum(e[:, None], e[None, :])
    valid = (e < E)[:, None] & (e < E)[None, :]
    c = tl.load(counts_ptr + hi * (hi + 1) // 2 + lo, mask=valid, other=0)
    return tl.where(e[:, None] == e[None, :], 2 * c, c)


@triton.jit
def _pair_place_kernel(
    index_ptr, rank_ptr, block_start_ptr, counts_ptr, bases_ptr, sorted_lo_slot_ptr,
    pair_offsets_ptr, sorted_to_slot_ptr, slot_to_sorted_ptr, offsets_ptr, tile_pair_ptr,
    tile_start_ptr, n_valid_ptr, n_items, E, n_pairs, n_blocks, n_tiles,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_T: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    """Programs ``0 .. n_blocks - 1`` place their block's items by pair (as the slots' place
    kernel does by expert) and both of each item's slots by expert: position = the expert's
    first position for that partner (``bases``, made by each program into its own scratch row,
    then gathered) + the item's rank among its pair's items (+ the pair's count for an item's
    second slot where both chose one expert). The programs after them write the pairs' offsets
    and tile table, and program ``n_blocks`` the experts' offsets. ``PDL``: launched as a
    programmatic dependent launch."""
    wait_for_previous(PDL)
    pid = tl.program_id(0)
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < n_pairs
    c = tl.load(counts_ptr + offs_p, mask=mask_p, other=0)
    end = tl.cumsum(c, axis=0)
    if pid < n_blocks:
        row = block_start_ptr + pid.to(tl.int64) * n_pairs
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_items
        pair, e0, e1 = _pair_number(index_ptr, offs, mask)
        rank = tl.load(rank_ptr + offs, mask=mask, other=0)
        # the item's rank among its pair's items: the earlier blocks' count + its rank here
        within = tl.load(row + pair, mask=mask, other=0) + rank
        before = tl.load(row + offs_p, mask=mask_p, other=0)
        tl.debug_barrier()  # every gather of the row as the scan left it, before it changes
        tl.store(row + offs_p, before + end - c, mask=mask_p)
        tl.debug_barrier()  # the row as stored, for the gather below
        position = tl.load(row + pair, mask=mask, other=0) + rank
        tl.store(sorted_lo_slot_ptr + position, offs * 2 + (e0 > e1).to(tl.int32), mask=mask)
        partners = _partner_counts(counts_ptr, E, BLOCK_E)
        totals = tl.sum(partners, axis=1)
        firsts = tl.cumsum(totals, axis=0) - totals
        bases = firsts[:, None] + tl.cumsum(partners, axis=1) - partners
        ee = tl.arange(0, BLOCK_E)
        scratch = bases_ptr + pid.to(tl.int64) * (BLOCK_E * BLOCK_E)
        tl.store(scratch + ee[:, None] * BLOCK_E + ee[None, :], bases)
        tl.debug_barrier()  # the bases as stored, for the gathers below
        twin = tl.where(e0 == e1, tl.load(counts_ptr + pair, mask=mask, other=0), 0)
        pos0 = tl.load(scratch + e0 * BLOCK_E + e1, mask=mask, other=0) + within
        pos1 = tl.load(scratch + e1 * BLOCK_E + e0, mask=mask, other=0) + within + twin
        slot = offs * 2
        tl.store(sorted_to_slot_ptr + pos0, slot, mask=mask)
        tl.store(sorted_to_slot_ptr + pos1, slot + 1, mask=mask)
        tl.store(slot_to_sorted_ptr + slot, pos0, mask=mask)
        tl.store(slot_to_sorted_ptr + slot + 1, pos1, mask=mask)
    else:
        program = pid - n_blocks
        if program == 0:
            ee = tl.arange(0, BLOCK_E)
            ends = tl.cumsum(tl.sum(_partner_counts(counts_ptr, E, BLOCK_E), axis=1), axis=0)
            tl.store(offsets_ptr + ee + 1, ends, mask=ee < E)
            tl.store(offsets_ptr + ee, 0, mask=ee == 0)
        _offsets_and_tiles(program, c, end, offs_p, mask_p, pair_offsets_ptr, tile_pair_ptr,
                           tile_start_ptr, n_valid_ptr, n_tiles, BLOCK_M, BLOCK_T)  # fmt: skip


# The pairs' routing launches: items per block of the rank and place kernels (doubled where a
# call's per-block pair counts would not fit ``MAX_BLOCK_COUNTS``), the rank kernel's and the
# place kernel's warps (benchmarks/sweep_pair_routing.py).
PAIR_ROUTING = {"block": ROUTING_BLOCK, "rank_warps": ROUTING_WARPS, "place_warps": 4}


def pair_routing_fits(n_slots: int, n_experts: int) -> bool:
    """Whether :func:`build_pair_routing` takes ``n_slots`` slots over ``n_experts`` experts
    (its per-block pair counts within ``MAX_BLOCK_COUNTS``)."""
    n_pairs = n_experts * (n_experts + 1) // 2
    return cdiv(n_slots // 2, 1024) * n_pairs <= MAX_BLOCK_COUNTS


def n_pair_tiles(n_items: int, n_experts: int, block_m: int) -> int:
    """Length of the pairs' tile table: enough for any distribution of the items."""
    return cdiv(n_items, block_m) + min(n_experts * (n_experts + 1) // 2, n_items)


def build_pair_routing(flat_index: torch.Tensor, n_experts: int, block_m: int, apart: bool = True):
    """The routing of a call by pairs (``flat_index [2 I]``, item ``i``'s slots ``2i``, ``2i +
    1``), int32: ``(sorted_to_slot, slot_to_sorted, offsets, tile_pair, tile_start, n_valid,
    sorted_lo_slot, pair_offsets)``: the slots sorted by expert and each expert's ``offsets``
    (``[E + 1]``, for the weight gradient), the pairs' tile table (``BLOCK_M = block_m`` items
    per tile, padding tiles numbered ``E * (E + 1) / 2``), the items sorted by pair, as the slot
    of each item's expert ``lo`` (``2i + (index[2i] > index[2i + 1])``: the kernels read an
    item's gates without waiting on ``index``), and each pair's ``pair_offsets`` (``[E * (E +
    1) / 2 + 1]``). Needs :func:`pair_routing_fits`. ``apart``: as in
    :func:`cvmm_kernel.moe_triton.build_routing`."""
    n = flat_index.numel()
    n_items, n_pairs = n // 2, n_experts * (n_experts + 1) // 2
    device = flat_index.device
    block = PAIR_ROUTING["block"]
    while cdiv(n_items, block) * n_pairs > MAX_BLOCK_COUNTS and block < 1024:
        block *= 2
    n_blocks = cdiv(n_items, block)
    if n_blocks * n_pairs > MAX_BLOCK_COUNTS:
        raise ValueError(f"{n} slots over {n_experts} experts are too many for pair routing")
    length = n_pair_tiles(n_items, n_experts, block_m)
    outputs = routing_outputs(
        device, apart, n, n, n_experts + 1, length, length, 1, n_items, n_pairs + 1
    )
    sorted_to_slot, slot_to_sorted, offsets, tile_pair, tile_start, n_valid = outputs[:6]
    sorted_lo_slot, pair_offsets = outputs[6:]
    if n_items == 0:
        offsets.zero_(), pair_offsets.zero_(), n_valid.zero_()
        return (sorted_to_slot, slot_to_sorted, offsets, tile_pair, tile_start, n_valid,
                sorted_lo_slot, pair_offsets)  # fmt: skip
    bins = next_power_of_2(n_pairs + 1)
    bins = bins if bins <= HISTOGRAM_MAX_BINS else 0
    block_e = next_power_of_2(n_experts)
    # the scratch in one allocation (apart where traced)
    counts, rank, block_counts, block_start, bases = _int32_views(
        device, n_pairs, n_items, n_blocks * n_pairs, n_blocks * n_pairs,
        n_blocks * block_e * block_e, zero=not bins, apart=is_traced(flat_index),
    )  # fmt: skip
    launch(_routing_rank_kernel, (n_blocks,), flat_index, rank, block_counts, n_items, n_pairs,
           block, bins, True, num_warps=PAIR_ROUTING["rank_warps"])  # fmt: skip
    scan_b, scan_e, scan_warps = ROUTING_SCAN
    launch(_routing_scan_kernel, (cdiv(n_pairs, scan_e),), block_counts, block_start, counts,
           n_blocks, n_pairs, scan_b, scan_e, num_warps=scan_warps)  # fmt: skip
    block_p = next_power_of_2(n_pairs)
    block_t = max(1, min(64, 16384 // block_p))
    launch(
        _pair_place_kernel, (n_blocks + max(1, cdiv(length, block_t)),),
        flat_index, rank, block_start, counts, bases, sorted_lo_slot, pair_offsets,
        sorted_to_slot, slot_to_sorted, offsets, tile_pair, tile_start, n_valid, n_items,
        n_experts, n_pairs, n_blocks, length, block, block_m, block_p, block_e, block_t,
        num_warps=PAIR_ROUTING["place_warps"],
    )  # fmt: skip
    return (sorted_to_slot, slot_to_sorted, offsets, tile_pair, tile_start, n_valid,
            sorted_lo_slot, pair_offsets)  # fmt: skip


@triton.jit
def _pair_experts(index_ptr, sorted_lo_slot_ptr, start):
    """``(lo, hi)``: the experts of the pair whose items start at sorted position ``start``."""
    slot_lo = tl.load(sorted_lo_slot_ptr + start).to(tl.int64)
    lo = tl.load(index_ptr + slot_lo).to(tl.int32)
    return lo, tl.load(index_ptr + (slot_lo ^ 1)).to(tl.int32)


@triton.jit
def _slot_gates(gate_ptr, slot_lo, mask_m):
    """``(slot_hi, g_lo, g_hi)`` of items given as their lo slots (int64): the other slot, and
    the fp32 gates of the pair's experts ``lo`` and ``hi``."""
    slot_hi = slot_lo ^ 1
    g_lo = tl.load(gate_ptr + slot_lo, mask=mask_m, other=0.0).to(tl.float32)
    g_hi = tl.load(gate_ptr + slot_hi, mask=mask_m, other=0.0).to(tl.float32)
    return slot_hi, g_lo, g_hi


@triton.jit
def _item_rows(a_ptr, slot_lo, mask_m, offs_k, mask_k, A_DIV, stride_am, stride_ak):
    """``[BLOCK_M, BLOCK_K]``: row ``i // A_DIV`` of ``a`` for each item ``i`` given as its lo
    slot (int64; zeros where masked)."""
    rows = a_ptr + (slot_lo // 2 // A_DIV)[:, None] * stride_am
    return tl.load(rows + offs_k[None, :] * stride_ak, mask=mask_m[:, None] & mask_k[None, :],
                   other=0.0)  # fmt: skip


@triton.jit
def _item_slots(gate_ptr, sorted_lo_slot_ptr, offs_m, mask_m):
    """Per sorted position: ``(item, slot_lo, slot_hi, g_lo, g_hi)``, the item (slots ``2i``,
    ``2i + 1``) and the slot (and its fp32 gate) of the pair's expert ``lo`` and of ``hi``
    (slot order where they are one), read from the routing's lo slots: no load waits on
    ``index``."""
    slot_lo = tl.load(sorted_lo_slot_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    slot_hi, g_lo, g_hi = _slot_gates(gate_ptr, slot_lo, mask_m)
    return slot_lo // 2, slot_lo, slot_hi, g_lo, g_hi


@triton.jit
def _pair_row_extras(a_ptr, y_ptr, dgate_ptr, rows_ptr, slot_to_sorted_ptr, gate_ptr,
                     sorted_lo_slot_ptr, start, end, K, A_DIV, stride_am, stride_ak, stride_ym,
                     stride_rm, GATE_DOT: tl.constexpr, SORTED_ROWS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """For both slots ``s`` of the pair's items ``i`` at sorted positions ``start:end`` (the
    pair's experts ``lo <= hi``), with ``r = a[i // A_DIV]`` (``K`` wide): ``GATE_DOT``:
    ``dgate[s] = <y[s], r>`` (fp32); ``SORTED_ROWS``: ``rows[slot_to_sorted[s]] = g_s * r``, the
    gated rows in the experts' order (the weight gradient's operand, rounded to ``rows``'
    dtype)."""
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs = tl.arange(0, BLOCK_M)
    # each tile's lo slots loaded a tile ahead: its other loads then wait on nothing
    slots_next = tl.load(sorted_lo_slot_ptr + start + offs, mask=start + offs < end, other=0)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + offs
        mask_m = offs_m < end
        mask = mask_m[:, None] & mask_k[None, :]
        slot_lo = slots_next.to(tl.int64)
        pos_after = m0 + BLOCK_M + offs
        slots_next = tl.load(sorted_lo_slot_ptr + pos_after, mask=pos_after < end, other=0)
        slot_hi, g_lo, g_hi = _slot_gates(gate_ptr, slot_lo, mask_m)
        a = _item_rows(a_ptr, slot_lo, mask_m, offs_k, mask_k, A_DIV, stride_am,
                       stride_ak).to(tl.float32)  # fmt: skip
        if GATE_DOT:
            y_lo = tl.load(y_ptr + slot_lo[:, None] * stride_ym + offs_k[None, :], mask=mask,
                           other=0.0)  # fmt: skip
            y_hi = tl.load(y_ptr + slot_hi[:, None] * stride_ym + offs_k[None, :], mask=mask,
                           other=0.0)  # fmt: skip
            tl.store(dgate_ptr + slot_lo, tl.sum(y_lo.to(tl.float32) * a, axis=1), mask=mask_m)
            tl.store(dgate_ptr + slot_hi, tl.sum(y_hi.to(tl.float32) * a, axis=1), mask=mask_m)
        if SORTED_ROWS:
            pos_lo = tl.load(slot_to_sorted_ptr + slot_lo, mask=mask_m, other=0).to(tl.int64)
            pos_hi = tl.load(slot_to_sorted_ptr + slot_hi, mask=mask_m, other=0).to(tl.int64)
            dtype = rows_ptr.dtype.element_ty
            tl.store(rows_ptr + pos_lo[:, None] * stride_rm + offs_k[None, :],
                     (a * g_lo[:, None]).to(dtype), mask=mask)  # fmt: skip
            tl.store(rows_ptr + pos_hi[:, None] * stride_rm + offs_k[None, :],
                     (a * g_hi[:, None]).to(dtype), mask=mask)  # fmt: skip


@triton.jit
def _pair_rows_prefetched(a_ptr, out_ptr, gate_ptr, sorted_lo_slot_ptr, b_lo, b_hi, start, end, K,
                          A_DIV, stride_am, stride_ak, stride_om, stride_on, offs_n, mask_n,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          INPUT_PRECISION: tl.constexpr):  # fmt: skip
    """``_pair_rows_kernel``'s walk over the items at sorted positions ``start:end`` with the
    loads prefetched by hand into registers: a tile's rows and gates are loaded while the tile
    before it is multiplied and stored, and its lo slots one tile earlier still. (Triton's
    pipeliner issues these indirect loads after the epilogue and waits for them at the next
    tile's start, so their latency is exposed once per tile.)"""
    offs = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    mask_m = start + offs < end
    slot = tl.load(sorted_lo_slot_ptr + start + offs, mask=mask_m, other=0).to(tl.int64)
    slots_next = tl.load(sorted_lo_slot_ptr + start + BLOCK_M + offs,
                         mask=start + BLOCK_M + offs < end, other=0)  # fmt: skip
    _slot_hi, g_lo, g_hi = _slot_gates(gate_ptr, slot, mask_m)
    a = _item_rows(a_ptr, slot, mask_m, offs_k, mask_k, A_DIV, stride_am, stride_ak)
    for m0 in range(start, end, BLOCK_M):
        pos_after = m0 + 2 * BLOCK_M + offs
        slots_after = tl.load(sorted_lo_slot_ptr + pos_after, mask=pos_after < end, other=0)
        mask_next = m0 + BLOCK_M + offs < end
        slot_next = slots_next.to(tl.int64)
        _slot_hi, g_lo_next, g_hi_next = _slot_gates(gate_ptr, slot_next, mask_next)
        a_next = _item_rows(a_ptr, slot_next, mask_next, offs_k, mask_k, A_DIV, stride_am,
                            stride_ak)  # fmt: skip
        acc = tl.dot(a, b_lo, input_precision=INPUT_PRECISION) * g_lo[:, None]
        acc += tl.dot(a, b_hi, input_precision=INPUT_PRECISION) * g_hi[:, None]
        tl.store(
            out_ptr + (slot // 2)[:, None] * stride_om + offs_n[None, :] * stride_on,
            acc.to(out_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_n[None, :],
        )
        slot, slots_next, mask_m = slot_next, slots_after, mask_next
        g_lo, g_hi, a = g_lo_next, g_hi_next, a_next


@triton.jit
def _pair_rows_kernel(
    a_ptr, w_ptr, out_ptr, y_ptr, dgate_ptr, rows_ptr, slot_to_sorted_ptr, index_ptr, gate_ptr,
    sorted_lo_slot_ptr, offsets_ptr, K, N, A_DIV, stride_am, stride_ak, stride_we, stride_wk,
    stride_wn, stride_om, stride_on, stride_ym, stride_rm, GATE_DOT: tl.constexpr,
    SORTED_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, W_DESC: tl.constexpr,
    N_STAGES: tl.constexpr, PREFETCH: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    """Products of items of two slots, one program per (pair of experts, column block): item
    ``i`` reads row ``i // A_DIV`` of ``a`` and stores ``out[i] = g_lo * a @ W[lo] + g_hi * a @
    W[hi]`` (fp32 sum of the two gated products), each slot's gate with its own expert. The
    program loads its two weight blocks once and walks the pair's items ``BLOCK_M`` at a time
    (a pair has a few hundred items: the weights, not the rows, are the traffic to save), its
    loads prefetched by hand where ``PREFETCH`` (:func:`_pair_rows_prefetched`), else pipelined
    by Triton over ``N_STAGES``.
    ``GATE_DOT``, ``SORTED_ROWS``: one more program per pair each, after its column blocks,
    walks its items' rows for the gate's gradient from the forward's kept products ``y``, for
    the gated rows in the experts' order (:func:`_pair_row_extras`; one program doing both
    measured slower: benchmarks/results/ab_pair_rows_first.md)."""
    wait_for_previous(PDL)
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    per_pair = n_blocks + GATE_DOT + SORTED_ROWS
    pair = pid // per_pair
    col_block = pid - pair * per_pair
    start = tl.load(offsets_ptr + pair)
    end = tl.load(offsets_ptr + pair + 1)
    if start == end:
        return
    if GATE_DOT:  # noqa: SIM102 (a constexpr branch, then a runtime one)
        if col_block == n_blocks:
            _pair_row_extras(a_ptr, y_ptr, dgate_ptr, rows_ptr, slot_to_sorted_ptr, gate_ptr,
                             sorted_lo_slot_ptr, start, end, K, A_DIV, stride_am,
                             stride_ak, stride_ym, stride_rm, True, False, BLOCK_M,
                             BLOCK_K)  # fmt: skip
            return
    if SORTED_ROWS:  # noqa: SIM102
        if col_block == per_pair - 1:
            _pair_row_extras(a_ptr, y_ptr, dgate_ptr, rows_ptr, slot_to_sorted_ptr, gate_ptr,
                             sorted_lo_slot_ptr, start, end, K, A_DIV, stride_am,
                             stride_ak, stride_ym, stride_rm, False, True, BLOCK_M,
                             BLOCK_K)  # fmt: skip
            return
    lo, hi = _pair_experts(index_ptr, sorted_lo_slot_ptr, start)
    n0 = col_block * BLOCK_N
    b_lo = _weight_block(
        w_ptr, lo, 0, n0, K, N, stride_we, stride_wk, stride_wn, W_DESC, BLOCK_K, BLOCK_N
    )
    b_hi = _weight_block(
        w_ptr, hi, 0, n0, K, N, stride_we, stride_wk, stride_wn, W_DESC, BLOCK_K, BLOCK_N
    )
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if PREFETCH:
        _pair_rows_prefetched(a_ptr, out_ptr, gate_ptr, sorted_lo_slot_ptr, b_lo, b_hi, start, end,
                              K, A_DIV, stride_am, stride_ak, stride_om, stride_on, offs_n,
                              mask_n, BLOCK_M, BLOCK_K, INPUT_PRECISION)  # fmt: skip
        return
    for m0 in tl.range(start, end, BLOCK_M, num_stages=N_STAGES):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        item, _slot_lo, _slot_hi, g_lo, g_hi = _item_slots(gate_ptr, sorted_lo_slot_ptr, offs_m,
                                                           mask_m)  # fmt: skip
        a = tl.load(
            a_ptr + (item // A_DIV)[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=mask_m[:, None] & (offs_k < K)[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b_lo, input_precision=INPUT_PRECISION) * g_lo[:, None]
        acc += tl.dot(a, b_hi, input_precision=INPUT_PRECISION) * g_hi[:, None]
        tl.store(
            out_ptr + item[:, None] * stride_om + offs_n[None, :] * stride_on,
            acc.to(out_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_n[None, :],
        )


@triton.jit
def _pair_gemm_kernel(
    a_ptr, w_ptr, out_ptr, y_ptr, h_ptr, dgate_ptr, index_ptr, gate_ptr, sorted_lo_slot_ptr,
    tile_pair_ptr, tile_start_ptr, offsets_ptr, n_valid_ptr, K, N, A_DIV, H_DIV,
    stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_om, stride_ym, stride_hm,
    stride_dg, STORE_Y: tl.constexpr, GATE_GRAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    W_DESC: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    """One tile of a pair's items (the pairs' tile table) times one column block: item ``i``
    reads row ``i // A_DIV`` of ``a``, accumulates ``z_lo = a @ W[lo]`` and ``z_hi = a @ W[hi]``
    over ``K`` (each block of rows loaded once for both) and stores ``out[i] = g_lo * z_lo +
    g_hi * z_hi`` (fp32 sum). ``STORE_Y``: also ``y[slot] = z`` of each slot, ungated, in
    ``y``'s dtype. ``GATE_GRAD``: also ``dgate[pid_n, slot] = <z, h[i // H_DIV]>`` over the
    column block (the caller sums the blocks)."""
    wait_for_previous(PDL)
    n_col_blocks = tl.cdiv(N, BLOCK_N)
    work = tl.program_id(0)
    tile = work // n_col_blocks
    if tile >= tl.load(n_valid_ptr):
        return
    pid_n = work - tile * n_col_blocks
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    pair = tl.load(tile_pair_ptr + tile)
    start = tl.load(tile_start_ptr + tile)
    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < tl.load(offsets_ptr + pair + 1)
    mask_mn = mask_m[:, None] & mask_n[None, :]
    lo, hi = _pair_experts(index_ptr, sorted_lo_slot_ptr, start)
    item, slot_lo, slot_hi, g_lo, g_hi = _item_slots(gate_ptr, sorted_lo_slot_ptr, offs_m, mask_m)
    if GATE_GRAD:  # loaded before the K loop, so its latency hides behind it
        h = tl.load(
            h_ptr + (item // H_DIV)[:, None] * stride_hm + offs_n[None, :], mask=mask_mn, other=0.0
        ).to(tl.float32)
    a_rows = a_ptr + (item // A_DIV)[:, None] * stride_am
    acc_lo = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_hi = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            a_rows + offs_k[None, :] * stride_ak, mask=mask_m[:, None] & (offs_k < K)[None, :],
            other=0.0,
        )  # fmt: skip
        b_lo = _weight_block(
            w_ptr, lo, k0, n0, K, N, stride_we, stride_wk, stride_wn, W_DESC, BLOCK_K, BLOCK_N
        )
        b_hi = _weight_block(
            w_ptr, hi, k0, n0, K, N, stride_we, stride_wk, stride_wn, W_DESC, BLOCK_K, BLOCK_N
        )
        acc_lo = tl.dot(a, b_lo, acc_lo, input_precision=INPUT_PRECISION)
        acc_hi = tl.dot(a, b_hi, acc_hi, input_precision=INPUT_PRECISION)
    out = acc_lo * g_lo[:, None] + acc_hi * g_hi[:, None]
    tl.store(
        out_ptr + item[:, None] * stride_om + offs_n[None, :], out.to(out_ptr.dtype.element_ty),
        mask=mask_mn,
    )  # fmt: skip
    if STORE_Y:
        cols = offs_n[None, :]
        tl.store(y_ptr + slot_lo[:, None] * stride_ym + cols, acc_lo.to(y_ptr.dtype.element_ty),
                 mask=mask_mn)  # fmt: skip
        tl.store(y_ptr + slot_hi[:, None] * stride_ym + cols, acc_hi.to(y_ptr.dtype.element_ty),
                 mask=mask_mn)  # fmt: skip
    if GATE_GRAD:
        parts = dgate_ptr + pid_n * stride_dg
        tl.store(parts + slot_lo, tl.sum(acc_lo * h, axis=1), mask=mask_m)
        tl.store(parts + slot_hi, tl.sum(acc_hi * h, axis=1), mask=mask_m)


def pair_rows(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    index: torch.Tensor,
    gate: torch.Tensor,
    sorted_lo_slot: torch.Tensor,
    offsets: torch.Tensor,
    a_div: int,
    config: tuple = (128, 64, 4, 3),
    *,
    products: torch.Tensor | None = None,
    dgate: torch.Tensor | None = None,
    sorted_rows: torch.Tensor | None = None,
    slot_to_sorted: torch.Tensor | None = None,
    prefetch: bool = True,
) -> None:
    """Launch ``_pair_rows_kernel``: ``out[i] = sum_{j < 2} gate[2i + j] * a[i // a_div] @
    w[index[2i + j]]`` for the items sorted by pair of experts (``sorted_lo_slot``, each pair's
    ``offsets[p]:offsets[p + 1]``), ``K = a.shape[1] <= ROWS_MAX_K``; ``config``: ``(BLOCK_N,
    BLOCK_M, num_warps, num_stages)``. With slot ``s`` reading ``r_s = a[s // 2 // a_div]``:
    ``products [2 I, K]`` with ``dgate [2 I]`` float32: also ``dgate[s] = <products[s], r_s>``;
    ``sorted_rows [2 I, K]`` with ``slot_to_sorted``: also ``sorted_rows[slot_to_sorted[s]] =
    gate[s] * r_s`` (both contiguous along ``K``). ``prefetch``: the items' loads prefetched by
    hand (:func:`_pair_rows_prefetched`), else by Triton's pipeliner (``num_stages``)."""
    k, n_cols = a.shape[1], w.shape[2]
    if (products is None) != (dgate is None) or (sorted_rows is None) != (slot_to_sorted is None):
        raise ValueError("pair_rows takes products with dgate, sorted_rows with slot_to_sorted")
    for extra in (e for e in (products, sorted_rows) if e is not None):
        if extra.shape[1] != k or extra.stride(1) != 1:
            raise ValueError(f"pair_rows' products and sorted rows are {k} wide and contiguous")
    extras = (products is not None) + (sorted_rows is not None)
    if sorted_lo_slot.numel() == 0 or k == 0 or (n_cols == 0 and not extras):
        if dgate is not None:  # (no items, or empty rows: zero dots, no values)
            dgate.zero_()
        if sorted_rows is not None:
            sorted_rows.zero_()
        return
    if k > ROWS_MAX_K:
        raise ValueError(f"pair_rows takes inner sizes up to {ROWS_MAX_K}, got {k}")
    block_n, block_m, warps, stages = config
    es, bk = a.element_size(), max(16, next_power_of_2(k))
    stages, block_m = _fit(stages, block_m, lambda st, bm: 2 * bk * block_n * es
                           + st * bm * bk * es, _shared_memory_budget(a.device),
                           min_shrink=16)  # fmt: skip
    # no columns: only the extra programs run, and no descriptor of an empty matrix is made
    w_arg, w_desc = weight_operand(w, bk, block_n) if n_cols else (w, 0)
    dummy = offsets
    launch(
        _pair_rows_kernel,
        ((offsets.numel() - 1) * (cdiv(n_cols, block_n) + extras),),
        a, w_arg, out, dummy if products is None else products, dummy if dgate is None else dgate,
        dummy if sorted_rows is None else sorted_rows,
        dummy if slot_to_sorted is None else slot_to_sorted, index, gate, sorted_lo_slot, offsets,
        k, n_cols, a_div, *a.stride(), *w.stride(), *out.stride(),
        0 if products is None else products.stride(0),
        0 if sorted_rows is None else sorted_rows.stride(0), products is not None,
        sorted_rows is not None, block_m, block_n, bk, input_precision(a.dtype), w_desc, stages,
        prefetch,
        num_warps=warps,
        num_stages=stages,
    )  # fmt: skip


def pair_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    index: torch.Tensor,
    gate: torch.Tensor,
    routing,
    a_div: int,
    *,
    y: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
    h_div: int = 1,
    dgate: torch.Tensor | None = None,
    config: tuple = (128, 64, 4, 3),
) -> None:
    """Launch ``_pair_gemm_kernel``: ``out[i] = sum_{j < 2} gate[2i + j] * a[i // a_div] @
    w[index[2i + j]]`` (``out [I, N]`` contiguous) over the pairs' tile table of ``routing``
    (:func:`build_pair_routing`, ``BLOCK_M = routing.block_m``). ``y [2 I, N]`` (contiguous):
    also each slot's ungated product; ``h`` with ``dgate [cdiv(N, BLOCK_N), 2 I]`` float32:
    also each slot's ``<a[i // a_div] @ w[e], h[i // h_div]>`` per column block. ``config``:
    ``(BLOCK_N, BLOCK_K, num_warps, num_stages)``."""
    n_cols = w.shape[2]
    if routing.sorted_lo_slot.numel() == 0 or n_cols == 0:
        return
    if (h is None) != (dgate is None):
        raise ValueError("pair_gemm takes h and dgate together")
    block_n, block_k, warps, stages = config
    es, bm = a.element_size(), routing.block_m
    stages, block_k = _fit(stages, block_k, lambda st, bk: st * (bm * bk + 2 * bk * block_n) * es,
                           _shared_memory_budget(a.device), min_shrink=16)  # fmt: skip
    w_arg, w_desc = weight_operand(w, block_k, block_n)
    dummy = routing.pair_offsets
    launch(
        _pair_gemm_kernel,
        (routing.tile_expert.numel() * cdiv(n_cols, block_n),),
        a, w_arg, out, y if y is not None else dummy, h if h is not None else dummy,
        dgate if dgate is not None else dummy, index, gate, routing.sorted_lo_slot,
        routing.tile_expert, routing.tile_start, routing.pair_offsets, routing.n_valid,
        a.shape[1], n_cols, a_div, h_div, *a.stride(), *w.stride(), out.stride(0),
        n_cols if y is None else y.stride(0), 0 if h is None else h.stride(0),
        0 if dgate is None else dgate.stride(0), y is not None, h is not None, bm, block_n,
        block_k, input_precision(a.dtype), w_desc,
        num_warps=warps,
        num_stages=stages,
    )  # fmt: skip
