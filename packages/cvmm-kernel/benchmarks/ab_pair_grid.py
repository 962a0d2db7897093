r"""What the programs that find no work cost the pairs' kernels, at SwitchHead's V 4 x 8 shape.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':'):packages/cvmm-kernel/benchmarks \
        python3 packages/cvmm-kernel/benchmarks/ab_pair_grid.py

The pairs' kernels launch one program per pair number (``E * (E + 1) / 2``: 528 for 32
experts, of which SwitchHead's routing fills 112, a head's experts pairing only among
themselves) or per entry of a tile table sized for any distribution of the items; the
programs without work load their bounds and return. Times (``kernel_us_twice``, eager,
bf16), one process: ``pair_rows`` (V's input gradient, with the gate dots and sorted rows)
over every pair number, over the filled pairs only (offsets compacted on the host, the same
results), and with no item at all (every program returns at once); ``pair_gemm`` (V's forward,
keeping each slot's product) over the whole tile table, over its valid tiles only, and with no
valid tile. Writes ``ab_pair_grid.json`` to ``$OUT`` (else ``benchmarks/results``).
"""

from __future__ import annotations

import sys

import torch
from bench_cvmm import SHAPES, make_inputs
from bench_harness import kernel_us_twice, metadata, require_cuda, write_results


def main() -> int:
    if not require_cuda(__file__):
        return 2
    from cvmm_kernel import pair_slots
    from cvmm_kernel import pair_triton as pt
    from cvmm_kernel.moe_ops import BLOCK_M, Routing

    s = next(s for s in SHAPES if s.name == "switchhead-v-4x8")
    t = make_inputs(s, "cuda")
    index = t["index"].reshape(-1).contiguous()
    gate = t["gate"].reshape(-1).contiguous()
    n_experts = s.n_experts * s.heads
    fields = pair_slots.routing_impl(index, n_experts, BLOCK_M)
    routing = Routing(*fields[:6], BLOCK_M, *fields[6:])
    pair_offsets = routing.pair_offsets
    counts = pair_offsets[1:] - pair_offsets[:-1]
    filled = torch.cat([pair_offsets[:-1][counts > 0], pair_offsets[-1:]])
    no_items = torch.zeros_like(pair_offsets)
    n_valid = int(routing.n_valid)
    valid_only = routing._replace(tile_expert=routing.tile_expert[:n_valid],
                                  tile_start=routing.tile_start[:n_valid])  # fmt: skip
    no_tiles = routing._replace(n_valid=torch.zeros_like(routing.n_valid))

    n_slots, heads = index.numel(), s.heads
    dy = torch.randn(n_slots // 2, s.expert_size, device="cuda", dtype=torch.bfloat16)
    w_t = t["w"].transpose(1, 2)  # [E, 128, 1024]: V's input gradient reads W^T
    products = torch.randn(n_slots, s.expert_size, device="cuda", dtype=dy.dtype)
    dgate = torch.empty(n_slots, device="cuda", dtype=torch.float32)
    rows = torch.empty_like(products)
    items_dx = dy.new_empty(n_slots // 2, s.d_model)
    items_fwd = dy.new_empty(n_slots // 2, s.expert_size)
    y = dy.new_empty(n_slots, s.expert_size)

    def rows_kernel(offsets):
        return lambda: pt.pair_rows(
            dy,
            w_t,
            items_dx,
            index,
            gate,
            routing.sorted_lo_slot,
            offsets,
            1,
            products=products,
            dgate=dgate,
            sorted_rows=rows,
            slot_to_sorted=routing.slot_to_sorted,
        )

    def gemm_kernel(r):
        return lambda: pt.pair_gemm(t["x"], t["w"], items_fwd, index, gate, r, heads, y=y)

    outputs = []
    for fn in (rows_kernel(pair_offsets), rows_kernel(filled)):
        fn()
        outputs.append((items_dx.clone(), dgate.clone(), rows.clone()))
    for r in (routing, valid_only):
        gemm_kernel(r)()
        outputs.append((items_fwd.clone(), y.clone()))
    same = all(torch.equal(a, b) for a, b in zip(outputs[0], outputs[1])) and all(
        torch.equal(a, b) for a, b in zip(outputs[2], outputs[3])
    )
    cases = [
        (f"pair_rows, all {counts.numel()} pair numbers", rows_kernel(pair_offsets)),
        (f"pair_rows, the {filled.numel() - 1} filled pairs", rows_kernel(filled)),
        ("pair_rows, no items", rows_kernel(no_items)),
        (f"pair_gemm, all {routing.tile_expert.numel()} tiles", gemm_kernel(routing)),
        (f"pair_gemm, the {n_valid} valid tiles", gemm_kernel(valid_only)),
        ("pair_gemm, no valid tile", gemm_kernel(no_tiles)),
    ]
    timed = kernel_us_twice(cases, label_width=40)
    print(f"same results: {same}")
    write_results("ab_pair_grid", {"meta": metadata(dtype="bfloat16"), "rows": timed,
                  "same_results": same}, None, script_file=__file__)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
