r"""Launch-setting sweep of the routing metadata kernels (``moe_triton.build_routing``).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/cvmm-kernel/benchmarks/sweep_routing.py

For the slot and expert counts of the benchmark's shapes (MoEUT-244M's feedforward, 128 x 128
k=4, SwitchHead's value projection with 4 x 10 experts), times ``build_routing`` (median,
``triton.testing.do_bench``, eager) for each block size and warp count of the rank kernel, then
from CUDA-graph replays for each setting of the scan kernel, and checks that every setting gives
the same maps. Writes ``sweep_routing.json`` to ``$OUT`` (else
``benchmarks/results``).
"""

from __future__ import annotations

import sys

import torch
from bench_harness import median_ms, metadata, require_cuda, write_results
from cvmm_kernel import moe_triton as kt
from cvmm_kernel.moe_ops import n_tiles

CASES = [(131072, 387), (32768, 128), (65536, 40)]  # (slots, experts)
# The scan kernel's (blocks per step, experts per program, num_warps); the shipped one first.
SCANS = [kt.ROUTING_SCAN, (1024, 4, 4), (1024, 4, 8), (512, 8, 4), (1024, 8, 8), (1024, 2, 4),
         (512, 4, 4), (256, 4, 4), (1024, 1, 4), (2048, 2, 8)]  # fmt: skip


def main() -> int:
    if not require_cuda(__file__):
        return 2
    rows = []
    for n, e in CASES:
        index = torch.randint(0, e, (n,), device="cuda", generator=torch.Generator("cuda"))
        first = None
        for block in (64, 128, 256):
            for warps in (1, 2, 4, 8):
                build = lambda index=index, n=n, e=e, block=block, warps=warps: kt.build_routing(
                    index, e, 128, n_tiles(n, e, 128), block=block, warps=warps
                )
                maps = build()
                first = first or maps
                same = all(torch.equal(a, b) for a, b in zip(maps, first))
                us = 1e3 * median_ms(build, warmup=20, rep=100)
                rows.append({"slots": n, "experts": e, "block": block, "warps": warps,
                             "us": us, "same_maps": same})  # fmt: skip
                print(f"N={n} E={e} block={block} warps={warps}: {us:.1f} us same={same}")
    # the scan kernel's settings, timed from CUDA-graph replays (the GPU time, no host)
    scan_rows = []
    for n, e in CASES:
        index = torch.randint(0, e, (n,), device="cuda", generator=torch.Generator("cuda"))
        first = None
        for scan in SCANS:
            build = lambda index=index, n=n, e=e, scan=scan: kt.build_routing(
                index, e, 128, n_tiles(n, e, 128), scan=scan
            )
            maps = build()
            first = first or maps
            same = all(torch.equal(a, b) for a, b in zip(maps, first))
            us = 1e3 * median_ms(build, warmup=20, rep=100, cuda_graph=True)
            scan_rows.append({"slots": n, "experts": e, "scan": scan, "us": us, "same_maps": same})
            print(f"N={n} E={e} scan={scan}: {us:.1f} us (graph) same={same}")
    meta = metadata(timing="do_bench median of eager build_routing calls; scan_rows: of "
                    "CUDA-graph replays")  # fmt: skip
    write_results("sweep_routing", {"meta": meta, "rows": rows, "scan_rows": scan_rows}, None,
                  script_file=__file__)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
