"""Triton kernels of the fused sigma-MoE feedforward (``moe_mlp``) and its routing metadata.

Vocabulary. A token ``t`` picks ``k`` experts; its ``k`` (token, expert) pairs are the *slots*
``s = t * k + j``, ``N = T * k`` in all. Sorting the slots by expert (stably: equal experts keep
slot order) gives the *sorted positions* ``p``; ``sorted_to_slot[p]`` and ``slot_to_sorted[s]``
map between them and ``offsets[e]:offsets[e + 1]`` are expert ``e``'s positions. A *tile* is up
to ``BLOCK_M`` consecutive positions of one expert; the tile table (``tile_expert``,
``tile_start``) lists the tiles expert by expert, padded with ``tile_expert == E`` to a length
fixed on the host (``cdiv(N, BLOCK_M) + min(E, N)``), so nothing is read back.

Kernels:

- routing: ``_routing_rank_kernel`` (rank of each slot among the equal experts of its block of
  slots, and per-block expert counts), ``_routing_scan_kernel`` (each expert's count before each
  block, and its total) and ``_routing_place_kernel`` (position = expert offset + earlier
  blocks' count + rank; and the tile table). Integer work only: the same maps on every run.
- ``_moe_gemm_kernel``: one program per (tile, column block); the tile's rows are gathered from
  ``a`` (``A_GATHER``: row ``slot // k``, the token) or read in sorted order, multiplied by the
  tile's expert matrix with fp32 accumulation, then an epilogue (gate, activation, or the
  backward through both with the gate gradient) and a store to sorted rows, slot rows, or an
  atomic add into token rows.
- the sums by pairs of experts (:mod:`cvmm_kernel.pair_slots`) have their kernels in
  :mod:`cvmm_kernel.pair_triton` (their routing reuses the rank and scan kernels here).
- ``_moe_mlp_rows_kernel``: the whole feedforward forward per tile for expert sizes that fit
  one block: the up projection and activation (``h`` stored for the backward), then ``h``'s
  products with the down projection's column blocks from the registers.
- ``_moe_weight_grad_kernel``: ``dW[e] = A_e^T B_e`` over expert ``e``'s positions, one program per
  (expert, output tile), no atomics: deterministic. Stored in the master weight's dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from .host_math import cdiv, next_power_of_2
from .interpreter import interpreting
from .launcher import DESCRIPTORS_AVAILABLE, descriptor, launch, multiprocessors
from .pdl import wait_for_previous
from .traced_ops import is_traced
from .triton_kernels import _input_precision as input_precision
from .validation import _capability

# Activation codes shared with the Python side.
ACTIVATIONS = {"identity": 0, "relu": 1, "gelu": 2, "silu": 3}

# Output modes of _moe_gemm_kernel.
OUT_SORTED, OUT_SLOT, OUT_TOKEN_ATOMIC = 0, 1, 2
# Epilogues of _moe_gemm_kernel.
EPI_NONE, EPI_GATE, EPI_ACTIVATION, EPI_ACTIVATION_BACKWARD = 0, 1, 2, 3


@triton.jit
def _activate(u, ACT: tl.constexpr):
    if ACT == 1:
        out = tl.maximum(u, 0.0)
    elif ACT == 2:
        out = 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))
    elif ACT == 3:
        out = u * tl.sigmoid(u)
    else:
        out = u
    return out


@triton.jit
def _activation_grad(u, ACT: tl.constexpr):
    """d act(u) / du for the activations that need u (GELU, SiLU)."""
    if ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
        out = cdf + u * 0.3989422804014327 * tl.exp(-0.5 * u * u)
    else:
        s = tl.sigmoid(u)
        out = s + u * s * (1.0 - s)
    return out


@triton.jit
def _pair_number(index_ptr, items, mask):
    """``(hi * (hi + 1) / 2 + lo, e0, e1)`` for the items' two experts ``e0 = index[2i]``,
    ``e1 = index[2i + 1]`` (``lo = min``, ``hi = max``): one number per unordered pair,
    ``E * (E + 1) / 2`` in all."""
    first = items.to(tl.int64) * 2
    e0 = tl.load(index_ptr + first, mask=mask, other=0).to(tl.int32)
    e1 = tl.load(index_ptr + first + 1, mask=mask, other=0).to(tl.int32)
    lo = tl.minimum(e0, e1)
    hi = tl.maximum(e0, e1)
    return hi * (hi + 1) // 2 + lo, e0, e1


@triton.jit
def _routing_rank_kernel(
    expert_ptr, rank_ptr, block_counts_ptr, N, E, BLOCK: tl.constexpr, BINS: tl.constexpr,
    PAIRS: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    """Per block of slots: each slot's rank among the block's slots of its expert, and the
    block's per-expert counts. ``BINS > E`` (a power of two): the whole row of counts from a
    histogram whose spare last bin takes the padding slots (no memset before); ``BINS = 0``
    (many experts): the last slot of each expert in the block stores its count into a row
    zeroed before. ``PAIRS``: the ``N`` elements are items of two slots, binned by their pair
    of experts (:func:`_pair_number`; ``E`` is the number of pairs). ``PDL``: launched as a
    programmatic dependent launch."""
    wait_for_previous(PDL)
    block = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    offs = block * BLOCK + i
    mask = offs < N
    if PAIRS:
        e = tl.where(mask, _pair_number(expert_ptr, offs, mask)[0], -1)
    else:
        e = tl.load(expert_ptr + offs, mask=mask, other=-1).to(tl.int32)
    same = e[:, None] == e[None, :]
    rank = tl.sum((same & (i[None, :] < i[:, None])).to(tl.int32), axis=1)
    tl.store(rank_ptr + offs, rank, mask=mask)
    row = block_counts_ptr + block.to(tl.int64) * E
    if BINS > 0:
        counts = tl.histogram(tl.where(mask, e, BINS - 1), BINS)
        bins = tl.arange(0, BINS)
        tl.store(row + bins, counts, mask=bins < E)
    else:
        later = tl.sum((same & (i[None, :] > i[:, None])).to(tl.int32), axis=1)
        tl.store(row + e, rank + 1, mask=mask & (later == 0))


@triton.jit
def _routing_scan_kernel(
    block_counts_ptr,
    block_start_ptr,
    counts_ptr,
    n_blocks,
    E,
    BLOCK_B: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Per expert: exclusive prefix sum of its per-block counts over the blocks, and its total.
    ``PDL``: launched as a programmatic dependent launch."""
    wait_for_previous(PDL)
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    running = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for b0 in range(0, n_blocks, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask = (offs_b < n_blocks)[:, None] & mask_e[None, :]
        where = offs_b.to(tl.int64)[:, None] * E + offs_e[None, :]
        c = tl.load(block_counts_ptr + where, mask=mask, other=0)
        tl.store(block_start_ptr + where, running[None, :] + tl.cumsum(c, axis=0) - c, mask=mask)
        running += tl.sum(c, axis=0)
    tl.store(counts_ptr + offs_e, running, mask=mask_e)


@triton.jit
def _routing_place_kernel(
    expert_ptr,
    rank_ptr,
    block_start_ptr,
    counts_ptr,
    sorted_to_slot_ptr,
    slot_to_sorted_ptr,
    offsets_ptr,
    tile_expert_ptr,
    tile_start_ptr,
    n_valid_ptr,
    N,
    E,
    n_blocks,
    n_tiles,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_T: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """The last routing step, two jobs in one launch. Programs ``0 .. n_blocks - 1`` place the
    slots of their block: position = the expert's offset (an exclusive prefix sum of ``counts``
    that each program takes itself and adds to its row of ``block_start``, the earlier blocks'
    count of each expert) + the slot's rank. The programs after them write the expert offsets
    and the tile table, ``BLOCK_T`` tiles each (padding tiles get ``E``). ``PDL``: launched as
    a programmatic dependent launch."""
    wait_for_previous(PDL)
    pid = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    c = tl.load(counts_ptr + offs_e, mask=mask_e, other=0)
    end = tl.cumsum(c, axis=0)
    if pid < n_blocks:
        row = block_start_ptr + pid.to(tl.int64) * E
        before = tl.load(row + offs_e, mask=mask_e, other=0)
        tl.store(row + offs_e, before + end - c, mask=mask_e)
        tl.debug_barrier()  # the row as stored, for the gather below
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        e = tl.load(expert_ptr + offs, mask=mask, other=0).to(tl.int32)
        rank = tl.load(rank_ptr + offs, mask=mask, other=0)
        position = tl.load(row + e, mask=mask, other=0) + rank
        tl.store(slot_to_sorted_ptr + offs, position, mask=mask)
        tl.store(sorted_to_slot_ptr + position, offs, mask=mask)
    else:
        _offsets_and_tiles(pid - n_blocks, c, end, offs_e, mask_e, offsets_ptr, tile_expert_ptr,
                           tile_start_ptr, n_valid_ptr, n_tiles, BLOCK_M, BLOCK_T)  # fmt: skip


@triton.jit
def _offsets_and_tiles(
    program, c, end, offs_e, mask_e, offsets_ptr, tile_expert_ptr, tile_start_ptr, n_valid_ptr,
    n_tiles, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """A routing's offsets (bin ``e`` holds ``c[e]`` rows, ``end`` their inclusive prefix sum;
    stored by program 0) and ``BLOCK_T`` entries of its tile table from program ``program``:
    each bin's rows cut into ``BLOCK_M`` tiles, the bins one after the other (padding tiles get
    the number of bins)."""
    tiles = (c + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)
    if program == 0:
        tl.store(offsets_ptr + offs_e + 1, end, mask=mask_e)
        tl.store(offsets_ptr + offs_e, end - c, mask=offs_e == 0)
        tl.store(n_valid_ptr, tl.sum(tiles, axis=0))
    ids = program * BLOCK_T + tl.arange(0, BLOCK_T)
    done = (tile_end[None, :] <= ids[:, None]) & mask_e[None, :]
    expert = tl.sum(done.to(tl.int32), axis=1)
    mine = offs_e[None, :] == expert[:, None]
    first_tile = tl.sum(tl.where(mine, tile_end - tiles, 0), axis=1)
    first_row = tl.sum(tl.where(mine, end - c, 0), axis=1)
    mask_t = ids < n_tiles
    tl.store(tile_expert_ptr + ids, expert, mask=mask_t)
    tl.store(tile_start_ptr + ids, first_row + (ids - first_tile) * BLOCK_M, mask=mask_t)


@triton.jit
def _tile_rows(
    tile, sorted_to_slot_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr, A_DIV, OUT_DIV,
    A_GATHER: tl.constexpr, OUT_MODE: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """The rows of ``tile``: its expert, sorted positions and their mask, the row of each in the
    input (``A_GATHER``: ``slot // A_DIV``, e.g. the token, else the position) and in the output
    (``OUT_MODE``: 0 the position, 1 the slot, 2 ``slot // OUT_DIV``)."""
    expert = tl.load(tile_expert_ptr + tile)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(offsets_ptr + expert + 1)
    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    slot = tl.load(sorted_to_slot_ptr + offs_m, mask=mask_m, other=0)
    if A_GATHER:  # noqa: SIM108 (constexpr branch inside a Triton kernel)
        a_row = (slot // A_DIV).to(tl.int64)
    else:
        a_row = offs_m.to(tl.int64)
    if OUT_MODE == 0:
        out_row = offs_m.to(tl.int64)
    elif OUT_MODE == 1:
        out_row = slot.to(tl.int64)
    else:
        out_row = (slot // OUT_DIV).to(tl.int64)
    return expert, offs_m, mask_m, slot, a_row, out_row


@triton.jit
def _weight_block(
    w, expert, k0, n0, K, N, stride_we, stride_wk, stride_wn,
    W_DESC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``w[expert, k0:k0 + BLOCK_K, n0:n0 + BLOCK_N]`` (zeros outside ``[K, N]``). ``W_DESC``: 0
    ``w`` is a pointer with the given strides; 1 a tensor descriptor of ``[E, K, N]`` (a TMA
    load); 2 a descriptor of ``[E, N, K]`` (``w`` is the transpose of a contiguous matrix)."""
    if W_DESC == 1:
        b = w.load([expert, k0, n0]).reshape(BLOCK_K, BLOCK_N)
    elif W_DESC == 2:
        b = tl.trans(w.load([expert, n0, k0]).reshape(BLOCK_N, BLOCK_K))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        b = tl.load(
            w
            + expert.to(tl.int64) * stride_we
            + offs_k[:, None] * stride_wk
            + offs_n[None, :] * stride_wn,
            mask=(offs_k < K)[:, None] & (offs_n < N)[None, :],
            other=0.0,
        )
    return b


@triton.jit
def _moe_gemm_tile(
    work,
    a_ptr,
    w_ptr,
    out_ptr,
    aux_ptr,
    sorted_to_slot_ptr,
    tile_expert_ptr,
    tile_start_ptr,
    offsets_ptr,
    gate_ptr,
    h_ptr,
    u_ptr,
    gh_ptr,
    K,
    N,
    A_DIV,
    OUT_DIV,
    H_DIV,
    stride_am,
    stride_ak,
    stride_we,
    stride_wk,
    stride_wn,
    stride_om,
    stride_on,
    stride_hm,
    stride_aux,
    A_GATHER: tl.constexpr,
    OUT_MODE: tl.constexpr,
    EPILOGUE: tl.constexpr,
    ACT: tl.constexpr,
    STORE_PREACT: tl.constexpr,
    H_GATHER: tl.constexpr,
    STORE_GATED_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    W_DESC: tl.constexpr,
):
    """One work item: a (valid) tile of one expert times one column block of its matrix."""
    n_col_blocks = tl.cdiv(N, BLOCK_N)
    tile = work // n_col_blocks
    pid_n = work % n_col_blocks
    expert, offs_m, mask_m, slot, a_row, rows = _tile_rows(
        tile, sorted_to_slot_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr, A_DIV, OUT_DIV,
        A_GATHER, OUT_MODE, BLOCK_M,
    )  # fmt: skip
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask_mn = mask_m[:, None] & mask_n[None, :]
    sorted_rows = offs_m.to(tl.int64)[:, None] * stride_hm + offs_n[None, :]
    # The epilogue's operands are loaded before the K loop, so their latency hides behind it
    # (loaded after it, the backward's epilogue took 34 of the hidden gradient's 145 us at the
    # 244M shape, now 19 of 130: benchmarks/results/ab_kernel_parts.json).
    if EPILOGUE == 1 or EPILOGUE == 3:
        g = tl.load(gate_ptr + slot, mask=mask_m, other=0.0)
    if EPILOGUE == 3:
        if H_GATHER:  # h is the layer's input: row slot // H_DIV (a linear layer's backward)
            h_rows = (slot // H_DIV).to(tl.int64)[:, None] * stride_hm + offs_n[None, :]
        else:
            h_rows = sorted_rows
        h = tl.load(h_ptr + h_rows, mask=mask_mn, other=0.0)
        if ACT >= 2:
            u = tl.load(u_ptr + sorted_rows, mask=mask_mn, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(
            a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        b = _weight_block(
            w_ptr, expert, k0, pid_n * BLOCK_N, K, N, stride_we, stride_wk, stride_wn, W_DESC,
            BLOCK_K, BLOCK_N,
        )  # fmt: skip
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    if EPILOGUE == 1:  # y = g * (h @ W_down)
        acc = acc * g.to(tl.float32)[:, None]
    elif EPILOGUE == 2:  # h = act(x @ W_up), keeping u = x @ W_up where act' needs it
        if STORE_PREACT:
            tl.store(aux_ptr + sorted_rows, acc.to(aux_ptr.dtype.element_ty), mask=mask_mn)
        acc = _activate(acc, ACT)
    elif EPILOGUE == 3:  # z = dy @ W_down^T: dg = <z, h>, du = g * z * act'(u)
        h32 = h.to(tl.float32)
        g32 = g.to(tl.float32)[:, None]
        dg = tl.sum(acc * h32, axis=1)
        tl.store(aux_ptr + pid_n * stride_aux + slot, dg.to(aux_ptr.dtype.element_ty), mask=mask_m)
        if STORE_GATED_H:  # g * h (sorted), dW_down's operand
            tl.store(gh_ptr + sorted_rows, (h32 * g32).to(gh_ptr.dtype.element_ty), mask=mask_mn)
        acc = acc * g32
        if ACT == 1:
            acc = tl.where(h32 > 0.0, acc, 0.0)
        elif ACT >= 2:
            acc = acc * _activation_grad(u.to(tl.float32), ACT)

    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    if OUT_MODE == 2:
        tl.atomic_add(out_ptrs, acc, mask=mask_mn, sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_mn)


@triton.jit
def _moe_gemm_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    aux_ptr,
    sorted_to_slot_ptr,
    tile_expert_ptr,
    tile_start_ptr,
    offsets_ptr,
    n_valid_ptr,
    gate_ptr,
    h_ptr,
    u_ptr,
    gh_ptr,
    K,
    N,
    A_DIV,
    OUT_DIV,
    H_DIV,
    stride_am,
    stride_ak,
    stride_we,
    stride_wk,
    stride_wn,
    stride_om,
    stride_on,
    stride_hm,
    stride_aux,
    A_GATHER: tl.constexpr,
    OUT_MODE: tl.constexpr,
    EPILOGUE: tl.constexpr,
    ACT: tl.constexpr,
    STORE_PREACT: tl.constexpr,
    H_GATHER: tl.constexpr,
    STORE_GATED_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    W_DESC: tl.constexpr,
    PERSISTENT: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_previous(PDL)
    # Work items are numbered tile-major, so the programs running at one time share an
    # expert's matrix (and, for gathered rows, the tile's rows) in L2.
    n_work = tl.load(n_valid_ptr) * tl.cdiv(N, BLOCK_N)
    if PERSISTENT:
        # One program per SM walks the work items; flattening the nested loops lets the next
        # item's loads overlap this item's epilogue.
        for work in tl.range(tl.program_id(0), n_work, NUM_PROGRAMS, flatten=True):
            _moe_gemm_tile(
                work, a_ptr, w_ptr, out_ptr, aux_ptr, sorted_to_slot_ptr, tile_expert_ptr,
                tile_start_ptr, offsets_ptr, gate_ptr, h_ptr, u_ptr, gh_ptr, K, N, A_DIV, OUT_DIV,
                H_DIV, stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_om, stride_on,
                stride_hm, stride_aux, A_GATHER, OUT_MODE, EPILOGUE, ACT, STORE_PREACT, H_GATHER,
                STORE_GATED_H, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, W_DESC,
            )  # fmt: skip
    else:
        work = tl.program_id(0)
        if work < n_work:
            _moe_gemm_tile(
                work, a_ptr, w_ptr, out_ptr, aux_ptr, sorted_to_slot_ptr, tile_expert_ptr,
                tile_start_ptr, offsets_ptr, gate_ptr, h_ptr, u_ptr, gh_ptr, K, N, A_DIV, OUT_DIV,
                H_DIV, stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_om, stride_on,
                stride_hm, stride_aux, A_GATHER, OUT_MODE, EPILOGUE, ACT, STORE_PREACT, H_GATHER,
                STORE_GATED_H, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, W_DESC,
            )  # fmt: skip


@triton.jit
def _moe_gemm_rows_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    sorted_to_slot_ptr,
    tile_expert_ptr,
    tile_start_ptr,
    offsets_ptr,
    n_valid_ptr,
    gate_ptr,
    h_ptr,
    dgate_ptr,
    K,
    N,
    A_DIV,
    OUT_DIV,
    H_DIV,
    stride_am,
    stride_ak,
    stride_we,
    stride_wk,
    stride_wn,
    stride_om,
    stride_on,
    stride_hm,
    A_GATHER: tl.constexpr,
    OUT_MODE: tl.constexpr,
    GATE: tl.constexpr,
    GATE_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    W_DESC: tl.constexpr,
    N_STAGES: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """For inner sizes that fit one block (``K <= BLOCK_K``): one program per tile loads the
    tile's rows once and walks every column block of its expert's matrix, so the next block's
    weights load while this block's products are stored (the products dominate: K is small).

    ``GATE_GRAD`` (a linear layer's backward, ``z = dy @ W^T``): also ``dgate[slot] = <z, h>``
    with ``h`` the layer's input row ``slot // H_DIV``, summed over the column blocks."""
    wait_for_previous(PDL)
    tile = tl.program_id(0)
    if tile >= tl.load(n_valid_ptr):
        return
    expert, _positions, mask_m, slot, a_row, rows = _tile_rows(
        tile, sorted_to_slot_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr, A_DIV, OUT_DIV,
        A_GATHER, OUT_MODE, BLOCK_M,
    )  # fmt: skip
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    a = tl.load(
        a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak,
        mask=mask_m[:, None] & mask_k[None, :],
        other=0.0,
    )
    if GATE:
        g = tl.load(gate_ptr + slot, mask=mask_m, other=0.0).to(tl.float32)
    if GATE_GRAD:
        h_row = (slot // H_DIV).to(tl.int64) * stride_hm
        dg = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in tl.range(0, N, BLOCK_N, num_stages=N_STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_mn = mask_m[:, None] & mask_n[None, :]
        b = _weight_block(
            w_ptr, expert, 0, n0, K, N, stride_we, stride_wk, stride_wn, W_DESC, BLOCK_K, BLOCK_N
        )
        acc = tl.dot(a, b, input_precision=INPUT_PRECISION)
        if GATE_GRAD:
            h = tl.load(h_ptr + h_row[:, None] + offs_n[None, :], mask=mask_mn, other=0.0)
            dg += tl.sum(acc * h.to(tl.float32), axis=1)
        if GATE:
            acc = acc * g[:, None]
        out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
        if OUT_MODE == 2:
            tl.atomic_add(out_ptrs, acc, mask=mask_mn, sem="relaxed")
        else:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_mn)
    if GATE_GRAD:
        tl.store(dgate_ptr + slot, dg, mask=mask_m)


@triton.jit
def _moe_mlp_rows_kernel(
    x_ptr, w_up, w_down, h_ptr, u_ptr, out_ptr, sorted_to_slot_ptr, tile_expert_ptr,
    tile_start_ptr, offsets_ptr, n_valid_ptr, gate_ptr, D, H, N, TOP_K, stride_xm,
    stride_xk, stride_ue, stride_uk, stride_un, stride_de, stride_dk, stride_dn, stride_om,
    stride_on, ACT: tl.constexpr, STORE_PREACT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UP_DESC: tl.constexpr, DOWN_DESC: tl.constexpr,
    UP_STAGES: tl.constexpr, DOWN_STAGES: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    """The forward of a whole sigma-MoE feedforward per tile, for hidden sizes that fit one
    block (``H <= BLOCK_H``): ``h = act(x[token] @ w_up[e])`` (stored in sorted order for the
    backward, with ``u`` before the activation where ``STORE_PREACT``), then, from the
    registers, ``g * (h @ w_down[e])`` block by block of the output's columns, stored to the
    slot's row. One launch instead of the up projection's and the row-tile kernel's, and ``h``
    is not read back."""
    wait_for_previous(PDL)
    tile = tl.program_id(0)
    if tile >= tl.load(n_valid_ptr):
        return
    expert, offs_m, mask_m, slot, a_row, rows = _tile_rows(
        tile, sorted_to_slot_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr, TOP_K, 1, True,
        1, BLOCK_M,  # rows of x: slot // TOP_K; of out: the slot
    )  # fmt: skip
    g = tl.load(gate_ptr + slot, mask=mask_m, other=0.0).to(tl.float32)
    offs_h = tl.arange(0, BLOCK_H)
    mask_mh = mask_m[:, None] & (offs_h < H)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for k0 in tl.range(0, D, BLOCK_K, num_stages=UP_STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            x_ptr + a_row[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & (offs_k < D)[None, :],
            other=0.0,
        )
        b = _weight_block(
            w_up, expert, k0, 0, D, H, stride_ue, stride_uk, stride_un, UP_DESC, BLOCK_K, BLOCK_H
        )
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    h_rows = offs_m.to(tl.int64)[:, None] * H + offs_h[None, :]  # sorted h, u: [P, H]
    if STORE_PREACT:
        tl.store(u_ptr + h_rows, acc.to(u_ptr.dtype.element_ty), mask=mask_mh)
    h = _activate(acc, ACT).to(h_ptr.dtype.element_ty)  # rows past the tile: act(0) = 0
    tl.store(h_ptr + h_rows, h, mask=mask_mh)
    for n0 in tl.range(0, N, BLOCK_N, num_stages=DOWN_STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_mn = mask_m[:, None] & (offs_n < N)[None, :]
        w = _weight_block(
            w_down, expert, 0, n0, H, N, stride_de, stride_dk, stride_dn, DOWN_DESC, BLOCK_H,
            BLOCK_N,
        )  # fmt: skip
        y = tl.dot(h, w, input_precision=INPUT_PRECISION) * g[:, None]
        out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_mn)


@triton.jit
def _moe_weight_grad_kernel(
    a_ptr,
    b_ptr,
    dw_ptr,
    sorted_to_slot_ptr,
    offsets_ptr,
    gate_ptr,
    K,
    N,
    stride_am,
    stride_ak,
    stride_bm,
    stride_bn,
    stride_ds,
    stride_de,
    stride_dk,
    stride_dn,
    SPLIT: tl.constexpr,
    A_DIV: tl.constexpr,
    B_DIV: tl.constexpr,
    A_GATHER: tl.constexpr,
    B_GATHER: tl.constexpr,
    A_GATE: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    OFFSETS_I32: tl.constexpr,
    OUT_DESC: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """``dw[e] (+)= sum_{p in e} a[row_a(p)]^T b[row_b(p)]``, one ``BLOCK_K x BLOCK_N`` tile of
    one expert per program; ``ACCUMULATE`` adds to ``dw`` (in fp32) instead of overwriting.

    The rows are the loop here, so their index arithmetic runs every step, and with 2-3 programs
    per SM its latency is not hidden (Nsight Compute: integer instructions took most stall
    samples). Hence divisors known at compile time (a multiply and a shift, not a division) and,
    with ``OFFSETS_I32`` (every element of ``a`` and ``b`` within int32 offsets), 32-bit offsets:
    10-20% faster at the benchmark shapes (benchmarks/results/ab_wgrad_index_math.md).

    ``OUT_DESC``: how the tile is stored, coded as ``W_DESC`` is for the expert matrices: 0
    through pointers, 1 ``dw`` is a tensor descriptor of ``[E, K, N]`` (a TMA store), 2 one of
    its transpose (``OUT_DTYPE``: the descriptor's element type).

    ``SPLIT > 1`` (few experts with many rows: too few programs to fill the GPU): each expert's
    rows are cut into ``SPLIT`` ranges of whole ``BLOCK_M`` blocks, and program ``s`` of a tile
    writes its range's sum to ``dw[s]`` (``stride_ds``), a float32 buffer the caller sums."""
    wait_for_previous(PDL)
    pid = tl.program_id(0)
    k_blocks = tl.cdiv(K, BLOCK_K)
    n_blocks = tl.cdiv(N, BLOCK_N)
    # Expert-major order: the programs of one expert run together and share its rows in L2.
    expert = pid // (k_blocks * n_blocks * SPLIT)
    rest = pid % (k_blocks * n_blocks * SPLIT)
    part = rest // (k_blocks * n_blocks)
    rest = rest % (k_blocks * n_blocks)
    pid_k = rest // n_blocks
    pid_n = rest % n_blocks
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    if SPLIT > 1:
        chunk = tl.cdiv(tl.cdiv(end - start, SPLIT), BLOCK_M) * BLOCK_M
        start = tl.minimum(end, start + part * chunk)
        end = tl.minimum(end, start + chunk)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        slot = tl.load(sorted_to_slot_ptr + offs_m, mask=mask_m, other=0)
        if A_GATHER:  # noqa: SIM108 (constexpr branch inside a Triton kernel)
            a_row = (slot.to(tl.uint32) // A_DIV).to(tl.int32)  # slots are >= 0
        else:
            a_row = offs_m
        if B_GATHER:  # noqa: SIM108
            b_row = (slot.to(tl.uint32) // B_DIV).to(tl.int32)
        else:
            b_row = offs_m
        if not OFFSETS_I32:
            a_row = a_row.to(tl.int64)
            b_row = b_row.to(tl.int64)
        a = tl.load(
            a_ptr + a_row[None, :] * stride_am + offs_k[:, None] * stride_ak,
            mask=mask_k[:, None] & mask_m[None, :],
            other=0.0,
        )
        if A_GATE:
            g = tl.load(gate_ptr + slot, mask=mask_m, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * g[None, :]).to(a.dtype)
        b = tl.load(
            b_ptr + b_row[:, None] * stride_bm + offs_n[None, :] * stride_bn,
            mask=mask_m[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    if OUT_DESC == 1:  # dw: a descriptor of [E, K, N], a TMA store (clipped at the edges)
        where = [expert, pid_k * BLOCK_K, pid_n * BLOCK_N]
        if ACCUMULATE:
            acc += dw_ptr.load(where).reshape(BLOCK_K, BLOCK_N).to(tl.float32)
        dw_ptr.store(where, acc.to(OUT_DTYPE).reshape(1, BLOCK_K, BLOCK_N))
    elif OUT_DESC == 2:  # a descriptor of the transpose [E, N, K]
        where = [expert, pid_n * BLOCK_N, pid_k * BLOCK_K]
        acc_t = tl.trans(acc)
        if ACCUMULATE:
            acc_t += dw_ptr.load(where).reshape(BLOCK_N, BLOCK_K).to(tl.float32)
        dw_ptr.store(where, acc_t.to(OUT_DTYPE).reshape(1, BLOCK_N, BLOCK_K))
    else:
        dw_ptrs = (
            dw_ptr
            + part.to(tl.int64) * stride_ds
            + expert.to(tl.int64) * stride_de
            + offs_k[:, None] * stride_dk
            + offs_n[None, :] * stride_dn
        )
        mask_dw = mask_k[:, None] & mask_n[None, :]
        if ACCUMULATE:
            acc += tl.load(dw_ptrs, mask=mask_dw, other=0.0).to(tl.float32)
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask_dw)


# ----- tensor descriptors (TMA loads of the expert matrices on Hopper and later) -----

_DESCRIPTORS_AVAILABLE = DESCRIPTORS_AVAILABLE and hasattr(tl, "tensor_descriptor")

# Set TENSOR_DESCRIPTORS[0] = False to load the expert matrices through pointers everywhere
# (benchmarks/ab_tensor_descriptors.py compares the two in one process).
TENSOR_DESCRIPTORS = [_DESCRIPTORS_AVAILABLE]


def _has_tma(device: torch.device) -> bool:
    """The device loads tensor descriptors with TMA (compute capability 9.0 or later); the
    interpreter runs them too."""
    if device.type != "cuda":
        return interpreting()
    return _capability(device) >= (9, 0)


# EAGER_DESCRIPTORS[0] = False: tensor descriptors only for calls in CUDA-graph capture, pointers
# outside it. A descriptor costs host time at every call (its object and its encoding, made afresh
# for each step's new gradient buffers; moe_linear forward + backward 949 against 789 us of host
# time, benchmarks/results/host_breakdown.md), but MoEUT-244M's eager training step, host-bound,
# was no faster without them beyond the shared host's noise (8 alternating rounds per variant
# moving by 10-25% from round to round), while from a CUDA graph the descriptors' step takes
# 49.3 ms against 52.1 (moeut's benchmarks/results/ab_weight_descriptors.md). On by default.
# Read at each call.
EAGER_DESCRIPTORS = [True]


def _descriptors_pay(device: torch.device) -> bool:
    """Whether a call's tensor descriptors pay for their host time: while a CUDA graph is
    captured (made once, replayed without the host), with ``EAGER_DESCRIPTORS``, or off CUDA
    (the interpreter)."""
    return EAGER_DESCRIPTORS[0] or device.type != "cuda" or torch.cuda.is_current_stream_capturing()


def weight_operand(w: torch.Tensor, block_k: int, block_n: int) -> tuple[Any, int]:
    """The expert matrices ``w`` (``[E, K, N]``, any strides) as a kernel argument and its
    ``W_DESC`` code: a tensor descriptor of ``w`` (1) or of its transpose ``[E, N, K]`` (2) where
    one of the two is contiguous along its last dimension with 16-byte aligned rows, the device
    has TMA and the descriptors pay for their host time (:func:`_descriptors_pay`: in CUDA-graph
    capture), else ``w`` itself (0), loaded through pointers. Pointers too in a traced
    triton_op body (``w`` fake or functional): with descriptors there, torch 2.11's analysis of
    which arguments a kernel writes failed (it then takes every input as written and copies
    it), and compiling MoEUT-244M failed."""
    if (
        not TENSOR_DESCRIPTORS[0]
        or is_traced(w)
        or not _has_tma(w.device)
        or not _descriptors_pay(w.device)
        or w.data_ptr() % 16
    ):
        return w, 0
    es = w.element_size()
    s0, s1, s2 = w.stride()
    if s0 * es % 16:
        return w, 0
    if s2 == 1 and s1 * es % 16 == 0:
        return descriptor(w, list(w.shape), [s0, s1, 1], [1, block_k, block_n]), 1
    if s1 == 1 and s2 * es % 16 == 0:  # a descriptor of the transpose (made only here)
        view = w.transpose(1, 2)
        return descriptor(view, list(view.shape), [s0, s2, 1], [1, block_n, block_k]), 2
    return w, 0


# Slots per program of the routing kernels; the per-block counts are [cdiv(N, B), E] int32.
ROUTING_BLOCK = 128
# Warps of the rank kernel (a BLOCK x BLOCK comparison per program): one warp took the routing
# of MoEUT-244M's 131072 slots over 387 experts from 57 to 37 us on an H100, the same elsewhere
# (benchmarks/results/sweep_routing.json).
ROUTING_WARPS = 1
# The scan kernel's (blocks per step, experts per program, num_warps): the routing of
# MoEUT-244M's slots 25.4 us against 29.0 with (256, 16, 4), the others within 0.5 us
# (CUDA-graph replays on an H100, benchmarks/results/sweep_routing.json "scan_rows").
ROUTING_SCAN = (512, 4, 4)
# Up to this many experts (+1, as a power of two) the rank kernel writes whole rows of counts
# from a histogram (no memset launch before it); more experts: the counts of the experts present.
HISTOGRAM_MAX_BINS = 1024
# Above this many per-block counts the routing falls back to a stable sort (still no sync).
MAX_BLOCK_COUNTS = 1 << 24


def _int32_views(
    device: torch.device, *sizes: int, zero: bool = False, apart: bool = False
) -> list[torch.Tensor]:
    """1-d int32 tensors of ``sizes``, views of one buffer, each starting 128-byte aligned (as
    the kernels are specialised for aligned pointers); zeroed if ``zero``. ``apart``: each its
    own allocation instead (in a traced triton_op body: a compiled graph's kernel must not get
    two views of one buffer, which made MoEUT-244M's compiled step fault, ``traced_ops``)."""
    make = torch.zeros if zero else torch.empty
    if apart:
        return [make(size, dtype=torch.int32, device=device) for size in sizes]
    starts, total = [], 0
    for size in sizes:
        starts.append(total)
        total += -(-size // 32) * 32
    buffer = make(total, dtype=torch.int32, device=device)
    # one as_strided per view: less host time than a split into the parts and their padding
    return [buffer.as_strided((size,), (1,), start) for size, start in zip(sizes, starts)]


def routing_outputs(device: torch.device, apart: bool, *sizes: int) -> list[torch.Tensor]:
    """1-d int32 tensors of ``sizes`` for a routing's results: each its own allocation where
    ``apart`` (the outputs of a custom op must not alias), else views of one (one allocation
    instead of one per tensor: host time of eager calls, which keep them for the backward
    together). The kernels' scratch is another allocation (:func:`_int32_views`), freed after
    the launches: kept with the outputs it would stay until the backward (a few MB per call at
    MoEUT-244M's sizes)."""
    if apart:
        return [torch.empty(size, dtype=torch.int32, device=device) for size in sizes]
    return _int32_views(device, *sizes)


def build_routing(
    flat_index: torch.Tensor,
    n_experts: int,
    block_m: int,
    n_tiles: int,
    *,
    block: int | None = None,
    warps: int | None = None,
    scan: tuple[int, int, int] | None = None,
    apart: bool = True,
):
    """The routing layout of ``flat_index`` (``[N]``, values in ``[0, n_experts)``), int32:
    ``(sorted_to_slot, slot_to_sorted, offsets, tile_expert, tile_start, n_valid_tiles)``.

    Three launches, no sort and no host sync (the sizes depend on ``N`` and ``n_experts`` only).
    ``block`` and ``warps``: slots per program and warps of the rank kernel (default
    ``ROUTING_BLOCK`` and ``ROUTING_WARPS``), ``scan`` the scan kernel's settings (default
    ``ROUTING_SCAN``); ``benchmarks/sweep_routing.py`` passes others. ``apart``: each returned
    tensor its own allocation (a custom op's outputs must not alias), else views of one
    (:func:`routing_outputs`).
    """
    n = flat_index.numel()
    device = flat_index.device
    block = ROUTING_BLOCK if block is None else block
    warps = ROUTING_WARPS if warps is None else warps
    while cdiv(n, block) * n_experts > MAX_BLOCK_COUNTS and block < 1024:
        block *= 2
    n_blocks = cdiv(n, block)
    fallback = n_blocks * n_experts > MAX_BLOCK_COUNTS
    bins = next_power_of_2(n_experts + 1)
    bins = bins if bins <= HISTOGRAM_MAX_BINS and not fallback else 0
    scratch = (
        (n_experts,) if fallback else (n_experts, n, n_blocks * n_experts, n_blocks * n_experts)
    )
    sorted_to_slot, slot_to_sorted, offsets, tile_expert, tile_start, n_valid = routing_outputs(
        device, apart, n, n, n_experts + 1, n_tiles, n_tiles, 1
    )
    counts, *rest = _int32_views(
        device, *scratch, zero=fallback or not bins, apart=is_traced(flat_index)
    )
    if fallback:  # too many experts for per-block counts: a stable sort (still no sync)
        order = torch.sort(flat_index, stable=True).indices
        sorted_to_slot.copy_(order)
        slot_to_sorted.scatter_(0, order, torch.arange(n, dtype=torch.int32, device=device))
        # (not bincount, whose length depends on the values: the body may be traced)
        counts.index_add_(0, flat_index, torch.ones_like(flat_index, dtype=torch.int32))
        rank = block_start = counts  # unread: the place kernel has no slot to place
    else:
        rank, block_counts, block_start = rest
        launch(
            _routing_rank_kernel, (n_blocks,), flat_index, rank, block_counts, n, n_experts, block,
            bins, False, num_warps=warps,
        )  # fmt: skip
        scan_b, scan_e, scan_warps = ROUTING_SCAN if scan is None else scan
        launch(
            _routing_scan_kernel, (cdiv(n_experts, scan_e),),
            block_counts, block_start, counts, n_blocks, n_experts, scan_b, scan_e,
            num_warps=scan_warps,
        )  # fmt: skip
    block_e = next_power_of_2(n_experts)
    block_t = max(1, min(64, 16384 // block_e))
    place_blocks = 0 if fallback else n_blocks  # the fallback's sort has placed the slots
    launch(
        _routing_place_kernel, (place_blocks + max(1, cdiv(n_tiles, block_t)),),
        flat_index, rank, block_start, counts, sorted_to_slot, slot_to_sorted, offsets,
        tile_expert, tile_start, n_valid, n, n_experts, place_blocks, n_tiles, block, block_m,
        block_e, block_t,
    )  # fmt: skip
    return sorted_to_slot, slot_to_sorted, offsets, tile_expert, tile_start, n_valid


def _supports_flatten() -> bool:
    import inspect

    try:
        return "flatten" in inspect.signature(tl.range.__init__).parameters
    except (TypeError, ValueError):
        return False


PERSISTENT_AVAILABLE = _supports_flatten()


def _num_sms(device: torch.device) -> int:
    """The device's multiprocessors (4 on the interpreter)."""
    return multiprocessors(device) if device.type == "cuda" else 4


_SHARED_MEMORY: dict[int, int] = {}


def _shared_memory_budget(device: torch.device) -> int:
    """Bytes of shared memory a program may plan for: 85% of the device's opt-in limit per block
    (Triton's layout conversions take some beyond its pipeline buffers)."""
    if device.type != "cuda":
        return 1 << 30  # the interpreter has no limit
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SHARED_MEMORY:
        props = torch.cuda.get_device_properties(index)
        limit = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
        _SHARED_MEMORY[index] = int(0.85 * limit)
    return _SHARED_MEMORY[index]


def _fit(stages: int, shrink: int, bytes_of, budget: int, min_shrink: int = 32) -> tuple[int, int]:
    """Fewer pipeline stages (down to 2), then a smaller ``shrink`` block (halved, down to
    ``min_shrink``), until ``bytes_of(stages, shrink)`` fits ``budget``: the tuned settings are
    for 2-byte inputs, and float32 doubles every buffer."""
    while bytes_of(stages, shrink) > budget and stages > 2:
        stages -= 1
    while bytes_of(stages, shrink) > budget and shrink > min_shrink:
        shrink //= 2
    return stages, shrink


def moe_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    routing,
    top_k: int,
    *,
    a_gather: bool,
    out_mode: int,
    epilogue: int = EPI_NONE,
    activation: str = "identity",
    gate: torch.Tensor | None = None,
    aux: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
    gated_h: torch.Tensor | None = None,
    out_div: int | None = None,
    h_div: int | None = None,
    config: tuple = (128, 64, 4, 3),
) -> None:
    """Launch ``_moe_gemm_kernel``: ``out[row(p)] (+)= epilogue(a[row_a(p)] @ w[expert(p)])``.

    Args:
        a: ``[rows, K]``; ``w``: ``[E, K, N]`` (any strides); ``out``: ``[rows_out, N]``.
        routing: a :class:`cvmm_kernel.moe_ops.Routing` whose tiles have ``BLOCK_M`` rows.
        top_k: slots per row of ``a`` (gathered rows are ``slot // top_k``).
        out_div: slots per output row for ``OUT_TOKEN_ATOMIC`` (default ``top_k``).
        h_div: the gate-gradient epilogue reads ``h``'s row ``slot // h_div`` (the input rows of
            a linear layer) instead of the sorted position (default).
        gated_h: the gate-gradient epilogue also stores ``g * h`` there (``[P, N]``, sorted as
            ``h``; not with ``h_div``).
        config: ``(BLOCK_N, BLOCK_K, num_warps, num_stages[, persistent])``; persistent
            launches one program per SM (where the installed Triton can flatten loops).
    """
    n_tiles = routing.tile_expert.numel()
    n_cols = w.shape[2]
    block_n, block_k, warps, stages = config[:4]
    es, bm = a.element_size(), routing.block_m
    stages, block_k = _fit(stages, block_k, lambda st, bk: st * (bm * bk + bk * block_n) * es,
                           _shared_memory_budget(a.device), min_shrink=16)  # fmt: skip
    persistent = len(config) > 4 and config[4] and PERSISTENT_AVAILABLE
    n_work = n_tiles * cdiv(n_cols, block_n)
    if n_work == 0 or a.shape[1] == 0:
        return
    if gated_h is not None and (h_div is not None or epilogue != EPI_ACTIVATION_BACKWARD):
        raise ValueError("gated_h goes with the gate-gradient epilogue on sorted h only")
    programs = min(n_work, _num_sms(a.device)) if persistent else n_work
    dummy = routing.offsets
    w_arg, w_desc = weight_operand(w, block_k, block_n)
    launch(
        _moe_gemm_kernel,
        (programs,),
        a,
        w_arg,
        out,
        aux if aux is not None else dummy,
        routing.sorted_to_slot,
        routing.tile_expert,
        routing.tile_start,
        routing.offsets,
        routing.n_valid,
        gate if gate is not None else dummy,
        h if h is not None else dummy,
        u if u is not None else dummy,
        gated_h if gated_h is not None else dummy,
        a.shape[1],
        n_cols,
        top_k,
        top_k if out_div is None else out_div,
        1 if h_div is None else h_div,
        *a.stride(),
        *w.stride(),
        *out.stride(),
        n_cols if h is None or h_div is None else h.stride(0),  # sorted h, u: contiguous [P, N]
        aux.stride(0) if aux is not None else 0,
        a_gather,
        out_mode,
        epilogue,
        ACTIVATIONS[activation],
        epilogue == EPI_ACTIVATION and aux is not None,
        h_div is not None,
        gated_h is not None,
        routing.block_m,
        block_n,
        block_k,
        input_precision(a.dtype),
        w_desc,
        bool(persistent),
        programs,
        num_warps=warps,
        num_stages=stages,
    )


# Inner sizes up to this go to _moe_gemm_rows_kernel (when the epilogue is none or the gate).
ROWS_MAX_K = 128


def moe_gemm_rows(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    routing,
    top_k: int,
    *,
    a_gather: bool,
    out_mode: int,
    gate: torch.Tensor | None = None,
    out_div: int | None = None,
    h: torch.Tensor | None = None,
    h_div: int = 1,
    dgate: torch.Tensor | None = None,
    config: tuple = (128, 8, 3),
) -> None:
    """Launch ``_moe_gemm_rows_kernel``: ``out[row(p)] (+)= g * (a[row_a(p)] @ w[expert(p)])``
    with ``K = a.shape[1] <= ROWS_MAX_K``; ``config``: ``(BLOCK_N, num_warps, num_stages)``;
    ``top_k`` and ``out_div`` as in :func:`moe_gemm`. With ``h`` (``[rows, N]``, unit column
    stride) and ``dgate`` (``[slots]`` fp32): also ``dgate[s] = <a[row_a] @ w[e], h[s // h_div]>``
    (before the gate)."""
    n_tiles = routing.tile_expert.numel()
    k, n_cols = a.shape[1], w.shape[2]
    if n_tiles == 0 or k == 0 or n_cols == 0:
        return
    if k > ROWS_MAX_K:
        raise ValueError(f"moe_gemm_rows takes inner sizes up to {ROWS_MAX_K}, got {k}")
    block_n, warps, stages = config
    es, bm, bk = a.element_size(), routing.block_m, max(16, next_power_of_2(k))
    per_stage = lambda bn: bk * bn * es + (bm * bn * es if h is not None else 0)
    stages, block_n = _fit(stages, block_n, lambda st, bn: bm * bk * es + st * per_stage(bn),
                           _shared_memory_budget(a.device))  # fmt: skip
    w_arg, w_desc = weight_operand(w, bk, block_n)
    launch(
        _moe_gemm_rows_kernel,
        (n_tiles,),
        a,
        w_arg,
        out,
        routing.sorted_to_slot,
        routing.tile_expert,
        routing.tile_start,
        routing.offsets,
        routing.n_valid,
        gate if gate is not None else routing.offsets,
        h if h is not None else routing.offsets,
        dgate if dgate is not None else routing.offsets,
        k,
        n_cols,
        top_k,
        top_k if out_div is None else out_div,
        h_div,
        *a.stride(),
        *w.stride(),
        *out.stride(),
        h.stride(0) if h is not None else 0,
        a_gather,
        out_mode,
        gate is not None,
        dgate is not None,
        routing.block_m,
        block_n,
        bk,
        input_precision(a.dtype),
        w_desc,
        stages,
        num_warps=warps,
        num_stages=stages,
    )


def moe_mlp_rows(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    h: torch.Tensor,
    u: torch.Tensor | None,
    out: torch.Tensor,
    routing,
    top_k: int,
    *,
    activation: str,
    gate: torch.Tensor,
    config: tuple = (64, 128, 4, 3, 3),
) -> None:
    """Launch ``_moe_mlp_rows_kernel``: ``h = act(x[token] @ w_up[e])`` into ``h [N, H]``
    (sorted; ``u`` the pre-activation where given) and ``out[slot] = g * (h @ w_down[e])``
    (``out [N, d_out]``), for ``H <= ROWS_MAX_K``. ``config``: ``(BLOCK_K, BLOCK_N, num_warps,
    up stages, down stages)``."""
    n_tiles = routing.tile_expert.numel()
    d, hid, n_cols = w_up.shape[1], w_up.shape[2], w_down.shape[2]
    if n_tiles == 0 or n_cols == 0:
        return
    if hid > ROWS_MAX_K or hid == 0 or d == 0:
        raise ValueError(f"moe_mlp_rows takes hidden sizes from 1 to {ROWS_MAX_K}, got {hid}")
    block_k, block_n, warps, up_stages, down_stages = config
    bh = max(16, next_power_of_2(hid))
    up_arg, up_desc = weight_operand(w_up, block_k, bh)
    down_arg, down_desc = weight_operand(w_down, bh, block_n)
    launch(
        _moe_mlp_rows_kernel, (n_tiles,),
        x, up_arg, down_arg, h, u if u is not None else h, out, routing.sorted_to_slot,
        routing.tile_expert, routing.tile_start, routing.offsets, routing.n_valid, gate,
        d, hid, n_cols, top_k, *x.stride(), *w_up.stride(), *w_down.stride(),
        *out.stride(), ACTIVATIONS[activation], u is not None, routing.block_m, block_k,
        bh, block_n, input_precision(x.dtype), up_desc, down_desc, up_stages, down_stages,
        num_warps=warps, num_stages=max(up_stages, down_stages),
    )  # fmt: skip


def fits_int32(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` lies within an int32 offset of its first."""
    if t.is_contiguous():  # (most calls: no pass over the strides in Python)
        return t.numel() <= 2**31
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) < 2**31


# Weight-gradient tiles are stored by TMA where the destination allows (at the MoEUT-244M shape
# on an H100: dW_up 113 us against 116 through pointers, dW_down in its transposed form 111
# against 137; benchmarks/results/ab_wgrad_down.json). Set DESCRIPTOR_STORES[0] = False to store
# through pointers.
DESCRIPTOR_STORES = [True]
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _weight_grad_destination(out: torch.Tensor, block_k: int, block_n: int) -> tuple[Any, int]:
    """``out`` (``[E, K, N]``, or ``[S, E, K, N]`` split by rows) as the weight-gradient
    kernel's destination and its ``OUT_DESC`` code: a tensor descriptor of ``out`` or of its
    transpose as :func:`weight_operand` makes them, for an ``[E, K, N]`` destination, else
    ``out`` itself (0), stored through pointers."""
    if DESCRIPTOR_STORES[0] and out.dim() == 3:
        return weight_operand(out, block_k, block_n)
    return out, 0


def moe_weight_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    dw: torch.Tensor,
    routing,
    top_k: int,
    *,
    a_gather: bool,
    b_gather: bool,
    gate: torch.Tensor | None = None,
    b_div: int | None = None,
    accumulate: bool = False,
    config: tuple[int, ...] = (64, 128, 128, 8, 3),
    split: int | None = None,
) -> None:
    """Launch ``_moe_weight_grad_kernel``: ``dw[e] = sum_{p in e} a[row_a(p)]^T b[row_b(p)]``
    (``a``'s rows scaled by the slot's gate when ``gate`` is given; ``accumulate``: ``+=``).

    Args:
        a: ``[rows, K]``, b: ``[rows, N]``, dw: ``[E, K, N]`` written whole (every expert's
            block, 0 or unchanged for an expert without rows).
        top_k, b_div: slots per row of ``a`` and of ``b`` where gathered (``b_div`` defaults to
            ``top_k``).
        config: ``(BLOCK_M, BLOCK_K, BLOCK_N, num_warps, num_stages)``.
        split: ranges each expert's rows are cut into (None: :func:`row_split`'s choice); above
            1 the ranges' float32 sums go to a buffer that one ``sum`` over it adds up, in a
            fixed order (deterministic).
    """
    n_experts, k, n = dw.shape
    block_m, block_k, block_n, warps, stages = config
    es = a.element_size()
    stages, block_m = _fit(stages, block_m, lambda st, bm: st * (block_k * bm + bm * block_n) * es,
                           _shared_memory_budget(a.device), min_shrink=16)  # fmt: skip
    tiles = n_experts * cdiv(k, block_k) * cdiv(n, block_n)
    if tiles == 0:
        return
    if split is None:
        split = row_split(tiles, routing.sorted_to_slot.numel(), n_experts, block_m, a.device)
    out = dw if split == 1 else dw.new_empty((split, *dw.shape), dtype=torch.float32)
    out_arg, out_desc = _weight_grad_destination(out, block_k, block_n)
    launch(
        _moe_weight_grad_kernel,
        (tiles * split,),
        a,
        b,
        out_arg,
        routing.sorted_to_slot,
        routing.offsets,
        gate if gate is not None else routing.offsets,
        k,
        n,
        *a.stride(),
        *b.stride(),
        out.stride(0) if split > 1 else 0,
        *out.stride()[-3:],
        split,
        top_k,
        top_k if b_div is None else b_div,
        a_gather,
        b_gather,
        gate is not None,
        accumulate and split == 1,
        fits_int32(a) and fits_int32(b),
        out_desc,
        _TL_DTYPES[out.dtype],
        block_m,
        block_n,
        block_k,
        input_precision(a.dtype),
        num_warps=warps,
        num_stages=stages,
    )
    if split > 1:
        total = out.sum(0)
        if accumulate:
            dw.add_(total)
        else:
            dw.copy_(total)


# Weight gradients cut each expert's rows into ranges while fewer tiles than two per SM would
# run (each range keeps at least ROW_SPLIT_MIN_BLOCKS blocks of rows). Measured on an H100
# (benchmarks/results/ab_wgrad_row_split.md): SwitchHead's 4 x 4 experts (128 tiles) 0.75x the
# time in two ranges, 0.86-1.05x in 3-8 (waves that end part-full, the float32 buffer's sum);
# 4 x 8 experts (256 tiles) slower in any number of ranges.
ROW_SPLIT_PROGRAMS_PER_SM = 2
ROW_SPLIT_MIN_BLOCKS = 4
ROW_SPLIT_MAX = 4


def row_split(tiles: int, rows: int, n_experts: int, block_m: int, device: torch.device) -> int:
    """How many row ranges the weight-gradient kernel cuts each expert's rows into: more than
    one only where the tiles leave most of the GPU idle (a few experts with thousands of rows
    each), never under the interpreter. Decided from sizes only (the per-expert counts stay on
    the GPU)."""
    if device.type != "cuda" or interpreting():
        return 1
    wanted = ROW_SPLIT_PROGRAMS_PER_SM * _num_sms(device) // tiles
    blocks_per_expert = rows // max(n_experts, 1) // block_m
    return max(1, min(wanted, ROW_SPLIT_MAX, blocks_per_expert // ROW_SPLIT_MIN_BLOCKS))


# ----- gated sums and gate gradients over groups of consecutive slots -----


@triton.jit
def _gated_group_sum_kernel(
    y_ptr, gate_ptr, out_ptr, n_groups, N, K: tl.constexpr, GATED: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, EVICT: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    """``out[g] = sum_j gate[g*K + j] * y[g*K + j]`` in fp32 (``y``, ``out``: ``N`` wide); the
    plain sum without ``GATED``. The ``K`` loads of a row are unrolled, so all are in flight.
    ``EVICT``: the loads' eviction policy (``y`` is read once)."""
    wait_for_previous(PDL)
    offs_g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_g = offs_g < n_groups
    mask = mask_g[:, None] & (offs_n < N)[None, :]
    acc = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    for j in tl.static_range(K):
        slot = offs_g.to(tl.int64) * K + j
        y = tl.load(y_ptr + slot[:, None] * N + offs_n[None, :], mask=mask, other=0.0,
                    eviction_policy=EVICT)  # fmt: skip
        if GATED:
            g = tl.load(gate_ptr + slot, mask=mask_g, other=0.0).to(tl.float32)
            acc += g[:, None] * y.to(tl.float32)
        else:
            acc += y.to(tl.float32)
    out_ptrs = out_ptr + offs_g.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _group_dot_kernel(
    y_ptr, dy_ptr, out_ptr, n_slots, N, K, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    """``out[s] = <y[s], dy[s // K]>`` in fp32 (the gate gradient from saved products)."""
    wait_for_previous(PDL)
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < n_slots
    y_rows = offs_s.to(tl.int64)[:, None] * N
    dy_rows = (offs_s // K).to(tl.int64)[:, None] * N
    acc = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = mask_s[:, None] & (offs_n < N)[None, :]
        y = tl.load(y_ptr + y_rows + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + dy_rows + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(y * dy, axis=1)
    tl.store(out_ptr + offs_s, acc, mask=mask_s)


# gated_group_sum's launch settings by k: (groups per block, columns per block (at most the
# row's width), num_warps); GROUP_SUM_BLOCKS[0] for any k not listed
# (benchmarks/ab_group_sum.py).
GROUP_SUM_BLOCKS: dict[int, tuple[int, int, int]] = {0: (32, 128, 4)}
# GROUP_SUM_EVICT[0]: the eviction policy of gated_group_sum's loads ("" Triton's default). Each
# row is read once, and marked evict-first it leaves L2 to what is read again: whole steps 0.7%
# (MoEUT-244M's feedforward) to 1.7% (SwitchHead's O, 4 x 8) faster
# (benchmarks/results/ab_l2_order.md, ab_l2_order_ffn.md). Read at each call.
GROUP_SUM_EVICT = ["evict_first"]


def gated_group_sum(y: torch.Tensor, gate: torch.Tensor | None, k: int) -> torch.Tensor:
    """``y [G*k, N]`` (contiguous), ``gate [G*k]`` -> ``[G, N]`` in ``y``'s dtype: each group's
    gate-weighted sum of its ``k`` consecutive rows, in fp32, in a fixed order (``gate=None``:
    the plain sum; for small ``k`` about twice as fast as ``torch.sum`` over the middle dim of
    ``[G, k, N]`` on an H100, equal at k=16: benchmarks/results/ab_ksum.md)."""
    n_slots, n = y.shape
    out = y.new_empty(n_slots // k, n)
    if out.numel() == 0:
        return out.zero_()
    block_g, block_n, warps = GROUP_SUM_BLOCKS.get(k, GROUP_SUM_BLOCKS[0])
    block_n = min(block_n, next_power_of_2(n))
    if interpreting():
        block_g, block_n, warps = 16, 16, 4
    grid = (cdiv(out.shape[0], block_g), cdiv(n, block_n))
    launch(_gated_group_sum_kernel, grid, y, y if gate is None else gate, out, out.shape[0], n,
           k, gate is not None, block_g, block_n, GROUP_SUM_EVICT[0], num_warps=warps)  # fmt: skip
    return out


def group_dot(y: torch.Tensor, dy: torch.Tensor, k: int) -> torch.Tensor:
    """``y [S, N]``, ``dy [S // k, N]`` (contiguous) -> ``[S]`` fp32: ``<y[s], dy[s // k]>``."""
    n_slots, n = y.shape
    out = torch.empty(n_slots, dtype=torch.float32, device=y.device)
    if n_slots == 0:
        return out
    block_s, block_n = (16, 16) if interpreting() else (64, min(128, next_power_of_2(n)))
    launch(_group_dot_kernel, (cdiv(n_slots, block_s),), y, dy, out, n_slots, n, k,
           block_s, block_n)  # fmt: skip
    return out


@triton.jit
def _spread_slots_kernel(
    src_ptr, index_ptr, gate_ptr, out_ptr, W, n_experts,
    DIV: tl.constexpr, SRC_DIV: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_W: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    """Row ``r`` of ``out [R, E * W]``: ``out[r, e*W + c] = sum_j gate[s] * src[s // SRC_DIV, c]``
    over the slots ``s = r*DIV + j`` whose ``index[s] == e``, in fp32 in slot order
    (deterministic), zero for the experts no slot of the row chose. One program per (row,
    column block, block of experts), all its experts' tiles in registers."""
    wait_for_previous(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    experts = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_c = cols < W
    acc = tl.zeros((BLOCK_E, BLOCK_W), dtype=tl.float32)
    for j in tl.static_range(DIV):
        slot = row * DIV + j
        e = tl.load(index_ptr + slot)
        g = tl.load(gate_ptr + slot).to(tl.float32)
        src = tl.load(src_ptr + (slot // SRC_DIV) * W + cols, mask=mask_c, other=0.0)
        acc += tl.where(experts[:, None] == e, g * src.to(tl.float32)[None, :], 0.0)
    out_ptrs = out_ptr + row * n_experts * W + experts.to(tl.int64)[:, None] * W + cols[None, :]
    mask = (experts < n_experts)[:, None] & mask_c[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def spread_slots(
    src: torch.Tensor, index: torch.Tensor, gate: torch.Tensor, n_experts: int, div: int,
    src_div: int,
) -> torch.Tensor:  # fmt: skip
    """``src [S // src_div, W]`` (contiguous), ``index``, ``gate [S]`` -> ``[S // div, E * W]``
    in ``src``'s dtype (see ``_spread_slots_kernel``). One warp per program: 27 us at
    SwitchHead's 4 x 4 values on an H100 (a 15 us zero fill of the same size; 33-190 us for
    the other designs of benchmarks/results/sweep_spread.json)."""
    n_slots, w = index.numel(), src.shape[1]
    out = src.new_empty(n_slots // div, n_experts * w)
    if out.numel() == 0:
        return out
    block_w = 16 if interpreting() else min(128, next_power_of_2(w))
    block_e = min(16, next_power_of_2(n_experts))
    grid = (out.shape[0], cdiv(w, block_w), cdiv(n_experts, block_e))
    launch(_spread_slots_kernel, grid, src, index, gate, out, w, n_experts, div, src_div,
           block_e, block_w, num_warps=1)  # fmt: skip
    return out
