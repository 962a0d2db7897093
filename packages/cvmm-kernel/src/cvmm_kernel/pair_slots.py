"""``moe_linear``'s calls by *pairs* of experts, where each group chose two.

A routed linear layer sums per-slot products ``g_s * a[s // a_div] @ W[e_s]`` into output rows
of ``out_div`` slots (see :mod:`cvmm_kernel.linear_ops`). With ``k = 2`` a group's two slots
(an *item*: slots ``2i``, ``2i + 1``) read one input row and add into one output row, so an
item needs only

    ``y[i] = g_{2i} * a[i // (a_div / 2)] @ W[e_{2i}] + g_{2i+1} * a[...] @ W[e_{2i+1}]``,

one product row per item where per-slot products write two and sum them afterwards (a
memory-bound round trip over ``[N, d_out]``). Such a call routes its items by their pair of
experts (number ``hi * (hi + 1) / 2 + lo``, ``lo <= hi``), and, from the same three launches,
its slots by expert for the weight gradient (:func:`cvmm_kernel.pair_triton.build_pair_routing`):
one routing instead of the slots' and the pairs'. Every sum of the call then runs by pairs:

- inner sizes up to ``ROWS_MAX_K`` without more outputs: one program per (pair, column block)
  loads its two weight blocks once and walks the pair's items (a pair has a few hundred
  items, so the weights would otherwise be read again for every tile of rows);
- otherwise tiles of a pair's items accumulate both experts' products over the inner size,
  each row block loaded once for both, and also keep each slot's ungated product (the forward
  of a layer whose gate gradient reads them) or take the gate's gradient in the epilogue.

SwitchHead's 4 heads x 8 experts (2 chosen per head) make 112 pairs: its value and output
projections take this path forward and backward.
"""

from __future__ import annotations

import torch

from .dense_slots import INPUT_ROWS
from .moe_ops import _config
from .traced_ops import twin_ops
from .triton_modules import triton_module

# ENABLED[0] = False: per-slot products and their sum everywhere (benchmarks/ab_pair_slots.py
# compares the two in one process). Read at each call.
ENABLED = [True]
# GATE_DOTS[0] = False: a backward that reads the forward's kept products takes the gate's
# gradient from them in a kernel of its own (group_dot) instead of in the input gradient's
# launch (benchmarks/ab_pair_rows.py). Read at each call.
GATE_DOTS = [True]
# SORTED_ROWS[0] = False: the weight gradient of a call by pairs gathers both operands and
# scales one by the gate in its loop, instead of reading the gated rows that the input
# gradient's launch writes in the experts' order (benchmarks/ab_pair_rows.py). Read at each call.
SORTED_ROWS = [True]
# PREFETCH_ROWS[0] = False: the row-tile kernel's loads of a pair's items pipelined by Triton
# (which waits for them at each tile's start) instead of prefetched by hand a tile ahead
# (benchmarks/ab_pair_prefetch.py). Read at each call.
PREFETCH_ROWS = [True]
# The most experts whose pairs (E * (E + 1) / 2 numbers) the routing bins: above it, per-slot
# products.
MAX_EXPERTS = 64


def wanted(n_experts: int, k: int, n_slots: int, backend: str, layout: tuple) -> bool:
    """Whether a call of ``n_slots`` slots, ``k`` per group over ``n_experts``, runs by pairs
    (decided once per call: its backward follows its forward). ``layout``: the call's
    ``linear_ops.plan`` (deterministic): where the forward keeps its products and the backward
    takes the dense input-row layout, the forward would be its one sum by pairs, and that alone
    gains nothing (SwitchHead's V with 4 x 4 experts: 0.220 against 0.201 ms per step,
    benchmarks/results/ab_pair_routing_old_new.md)."""
    if not (ENABLED[0] and backend == "triton" and k == 2 and n_experts <= MAX_EXPERTS):
        return False
    if layout == (True, INPUT_ROWS):
        return False
    from .pair_triton import pair_routing_fits  # (torch.compile traces this function)

    return pair_routing_fits(n_slots, n_experts)


def routing_impl(index: torch.Tensor, n_experts: int, block_m: int, apart: bool = True):
    """:func:`cvmm_kernel.pair_triton.build_pair_routing` of ``index [N]`` (int64)."""
    return triton_module("pair_triton").build_pair_routing(index, n_experts, block_m, apart=apart)


def _routing_op(index: torch.Tensor, n_experts: int, block_m: int) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor, torch.Tensor,
]:  # fmt: skip
    """The routing of a call by pairs as an op (see :func:`routing_impl`)."""
    return routing_impl(index, n_experts, block_m)


moe_pair_routing, moe_pair_routing_traced = twin_ops("cvmm_kernel::moe_pair_routing", _routing_op)


def _routing_fake(index, n_experts, block_m):
    from .pair_triton import n_pair_tiles

    n = index.numel()
    length = n_pair_tiles(n // 2, n_experts, block_m)
    new = lambda size: index.new_empty(size, dtype=torch.int32)
    n_pairs = n_experts * (n_experts + 1) // 2
    return (new(n), new(n), new(n_experts + 1), new(length), new(length), new(1), new(n // 2),
            new(n_pairs + 1))  # fmt: skip


moe_pair_routing.register_fake(_routing_fake)
moe_pair_routing_traced.register_fake(_routing_fake)


def pair_sums(a: torch.Tensor, w: torch.Tensor, r, index: torch.Tensor, gate: torch.Tensor,
              a_div: int, out_div: int, configs=None, *, keep_products: bool = False,
              h: torch.Tensor | None = None, h_div: int = 1,
              products: torch.Tensor | None = None, sorted_rows: bool = False):  # fmt: skip
    """``(out, y, dgate, rows)``: ``out [N // out_div, d_out]`` in ``a``'s dtype, ``out[o] =
    sum_{s: s // out_div = o} g_s * a[s // a_div] @ w[index[s]]`` by items (products of two
    slots, then a fixed-order fp32 sum of ``out_div / 2`` items per row: deterministic), over
    the routing ``r`` of a call by pairs. ``keep_products``: ``y [N, d_out]`` the ungated
    per-slot products (else None); ``h``: ``dgate [N]`` float32, ``<a[s // a_div] @ w[e_s],
    h[s // h_div]>`` (else None). ``products [N, K]`` (contiguous, ``K = a.shape[1]``): the
    forward's kept products, ``dgate[s] = <products[s], a[s // a_div]>`` where the inner size
    takes the row-tile kernel (one more program per pair), else ``dgate`` None for the caller
    to make. ``sorted_rows``: also ``rows [N, K]``, the gated rows ``g_s * a[s // a_div]`` in the
    experts' order (``r.slot_to_sorted``) where the inner size takes the row-tile kernel
    (:func:`takes_rows_kernel`), else ``rows`` None. ``configs``: the call's launch settings
    per role."""
    pt, kt = triton_module("pair_triton"), triton_module("moe_triton")
    k, n = a.shape[1], w.shape[2]
    n_slots = index.numel()
    items = a.new_empty(n_slots // 2, n)
    y = dgate = rows = None
    if takes_rows_kernel(k, keep_products, h):
        config = _config("linear_pairs", k, n, configs)
        if products is not None:
            dgate = torch.empty(n_slots, dtype=torch.float32, device=a.device)
        if sorted_rows:
            rows = a.new_empty(n_slots, k)
        pt.pair_rows(a, w, items, index, gate, r.sorted_lo_slot, r.pair_offsets, a_div // 2,
                     config, products=products, dgate=dgate, sorted_rows=rows,
                     slot_to_sorted=r.slot_to_sorted if sorted_rows else None,
                     prefetch=PREFETCH_ROWS[0])  # fmt: skip
    else:
        config = _config("linear_pair_gemm", k, n, configs)
        y = a.new_empty(n_slots, n) if keep_products else None
        if h is not None:
            dgate = torch.empty(-(-n // config[0]), n_slots, dtype=torch.float32, device=a.device)
        pt.pair_gemm(a, w, items, index, gate, r, a_div // 2, y=y, h=h, h_div=h_div // 2,
                     dgate=dgate, config=config)  # fmt: skip
        if dgate is not None:
            dgate = dgate[0] if dgate.shape[0] == 1 else dgate.sum(0)
    out = items if out_div == 2 else kt.gated_group_sum(items, None, out_div // 2)
    return out, y, dgate, rows


def takes_rows_kernel(k: int, keep_products: bool, h: torch.Tensor | None) -> bool:
    """Whether :func:`pair_sums` of inner size ``k`` runs on the row-tile kernel (one program
    per pair and column block; else tiles of a pair's items over the inner size)."""
    return k <= triton_module("moe_triton").ROWS_MAX_K and not keep_products and h is None
