r"""Launch-setting sweep of the pairs' routing (``pair_triton.build_pair_routing``: rank, scan
and place kernels) at SwitchHead's 4 x 8 and 4 x 10 shapes.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':'):packages/cvmm-kernel/benchmarks \
        python3 packages/cvmm-kernel/benchmarks/sweep_pair_routing.py

For each setting of ``pair_triton.PAIR_ROUTING`` (items per block, the rank kernel's warps,
the place kernel's warps), times the three launches replayed from a CUDA graph (median, so
the gaps between them count) on the benchmark's router (``bench_cvmm.make_inputs``: 8192
tokens x 4 heads, a sigmoid top-2 per head), the shipped setting first and again last, and
checks that every setting gives the shipped maps. Writes ``sweep_pair_routing.{json,md}`` to
``$OUT`` (else ``benchmarks/results``).
"""

from __future__ import annotations

import sys

import torch
from bench_cvmm import Shape, make_inputs
from bench_harness import environment_line, median_ms, metadata, require_cuda, write_results
from cvmm_kernel import pair_triton as pt
from cvmm_kernel.moe_ops import BLOCK_M

SHIPPED = dict(pt.PAIR_ROUTING)
SETTINGS = [
    (block, rank_warps, place_warps)
    for block in (64, 128, 256)
    for rank_warps in (1, 2, 4, 8)
    for place_warps in (1, 2, 4, 8)
    if block * block // (32 * rank_warps) <= 1024  # the rank kernel's block x block compare
]


def _route(flat_index: torch.Tensor, n_experts: int, setting: tuple[int, int, int]):
    pt.PAIR_ROUTING.update(zip(("block", "rank_warps", "place_warps"), setting))
    try:
        return pt.build_pair_routing(flat_index, n_experts, BLOCK_M)
    finally:
        pt.PAIR_ROUTING.update(SHIPPED)


def main() -> int:
    if not require_cuda(__file__):
        return 2
    shipped = tuple(SHIPPED.values())
    rows = []
    for n_experts in (8, 10):
        s = Shape(f"switchhead-4x{n_experts}", 8192, 1024, n_experts, 128, 2, "o", heads=4)
        flat = make_inputs(s, "cuda")["index"].reshape(-1).contiguous()
        e_total = n_experts * s.heads
        reference = _route(flat, e_total, shipped)
        settings = [shipped, *[c for c in SETTINGS if c != shipped], shipped]
        for i, setting in enumerate(settings):
            maps = _route(flat, e_total, setting)
            same = all(torch.equal(a, b) for a, b in zip(maps, reference))
            us = 1e3 * median_ms(lambda setting=setting: _route(flat, e_total, setting),
                                 warmup=10, rep=50, cuda_graph=True)  # fmt: skip
            label = "shipped" if setting == shipped else ""
            label += " again" if i == len(settings) - 1 else ""
            rows.append(
                dict(
                    shape=s.name,
                    block=setting[0],
                    rank_warps=setting[1],
                    place_warps=setting[2],
                    us=us,
                    same_maps=same,
                    note=label.strip(),
                )
            )
            print(f"{s.name} {setting} {us:7.2f} us same={same} {label}")
    base = {r["shape"]: r["us"] for r in rows if r["note"] == "shipped"}
    meta = metadata(dtype="int64 index")
    lines = [
        f"pairs' routing launch settings, {environment_line(meta)}",
        "",
        "Made by `benchmarks/sweep_pair_routing.py`: `build_pair_routing` (rank, scan, place) "
        "replayed from a CUDA graph, median us, 8192 tokens x 4 heads, top-2 per head.",
        "",
        "| shape | items per block | rank warps | place warps | us | vs shipped | same maps |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {r['shape']} | {r['block']} | {r['rank_warps']} | {r['place_warps']} | "
            f"{r['us']:.2f} | {r['us'] / base[r['shape']]:.3f} | {r['same_maps']} |"
            + (f" {r['note']}" if r["note"] else "")
            for r in sorted(rows, key=lambda r: (r["shape"], r["us"]))
        ],
    ]
    write_results("sweep_pair_routing", {"meta": meta, "rows": rows},
                  "\n".join(lines) + "\n", script_file=__file__)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
