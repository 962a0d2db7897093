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

``--pdl``: instead, the shipped settings with the launches one after the other against chained
by programmatic dependent launch (``cvmm_kernel.pdl``), alternating, for these two routings and
the slots' routing (``moe_triton.build_routing``) of MoEUT-244M's feedforward (8192 tokens,
top-16 of 387) and 128 x 128 k=4; writes ``ab_routing_pdl_launches.{json,md}``.
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


def pdl_cases() -> int:
    """The ``--pdl`` comparison (module docstring)."""
    from cvmm_kernel import pdl
    from cvmm_kernel.moe_ops import n_tiles
    from cvmm_kernel.moe_triton import build_routing

    g = torch.Generator(device="cuda").manual_seed(0)
    cases = []
    for tokens, n_experts, k in [(8192, 387, 16), (8192, 128, 4)]:
        flat = torch.randn(tokens, n_experts, device="cuda", generator=g).topk(k, dim=-1).indices
        flat = flat.reshape(-1).contiguous()
        tiles = n_tiles(flat.numel(), n_experts, BLOCK_M)
        cases.append(
            (
                f"slots {tokens} x top-{k} of {n_experts}",
                lambda f=flat, e=n_experts, t=tiles: build_routing(f, e, BLOCK_M, t),
            )
        )
    for n_experts in (8, 10):
        s = Shape(f"switchhead-4x{n_experts}", 8192, 1024, n_experts, 128, 2, "o", heads=4)
        flat = make_inputs(s, "cuda")["index"].reshape(-1).contiguous()
        cases.append((f"pairs {s.name}", lambda f=flat, e=4 * n_experts:
                      pt.build_pair_routing(f, e, BLOCK_M)))  # fmt: skip
    rows = []
    for name, fn in cases:
        maps = {}
        for enabled in (False, True, False, True):
            pdl.ENABLED[0] = enabled
            maps.setdefault(enabled, fn())
            us = 1e3 * median_ms(fn, warmup=10, rep=50, cuda_graph=True)
            rows.append(dict(case=name, chained=enabled, us=us))
            print(f"{name:40s} chained={enabled!s:5s} {us:7.2f} us")
        pdl.ENABLED[0] = True
        same = all(torch.equal(a, b) for a, b in zip(maps[False], maps[True]))
        for row in rows[-4:]:
            row["same_maps"] = same
    meta = metadata(dtype="int64 index")
    lines = [
        f"routing launches one after the other or chained by PDL, {environment_line(meta)}",
        "",
        "Made by `benchmarks/sweep_pair_routing.py --pdl`: CUDA-graph replays, median us, two "
        "passes alternating.",
        "",
        "| routing | one after the other (us) | chained (us) | chained / not | same maps |",
        "|---|---|---|---|---|",
    ]
    for name, _fn in cases:
        mine = [r for r in rows if r["case"] == name]
        off = min(r["us"] for r in mine if not r["chained"])
        on = min(r["us"] for r in mine if r["chained"])
        lines.append(f"| {name} | {off:.2f} | {on:.2f} | {on / off:.3f} | {mine[0]['same_maps']} |")
    write_results("ab_routing_pdl_launches", {"meta": meta, "rows": rows},
                  "\n".join(lines) + "\n", script_file=__file__)  # fmt: skip
    return 0


def main() -> int:
    if not require_cuda(__file__):
        return 2
    if "--pdl" in sys.argv[1:]:
        return pdl_cases()
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
