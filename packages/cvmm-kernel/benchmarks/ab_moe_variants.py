r"""A/B of moe_mlp's internal schedule switches, forward + backward, CUDA-graph replay (bf16).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/cvmm-kernel/benchmarks/ab_moe_variants.py [shape ...]

One process, one shape at a time: the dense matmuls of equal FLOPs, then moe_mlp with each
combination of the backward's overlap (dx on a side stream or not: the private
``moe_mlp(..., _backward_overlap=)``, shipped ``moe_ops.BACKWARD_SCHEDULE["overlap"]``) and tile
height (``block_m=`` 128, 64 or 256 rows; ``AB_BLOCK_M=64,128`` picks some; other than 128 with
the 8-warp GEMM settings of ``_tall_tiles`` as ``gemm_configs=``), all passed per call. Every
variant's output and gradients are compared with the first variant's. Writes
``ab_moe_variants.json`` and ``.md`` to ``$OUT`` (else ``benchmarks/results``).
"""

from __future__ import annotations

import os
import sys

import torch
from bench_cvmm import (
    SHAPES,
    dense_equal_flops,
    flops,
    fwd_bwd_step,
    make_inputs,
    ours_fused,
    trained_tensors,
)
from bench_harness import (
    environment_line,
    median_ms,
    metadata,
    require_cuda,
    table_header,
    write_results,
)
from cvmm_kernel import moe_ops

VARIANTS = [(overlap, bm) for bm in (128, 64, 256) for overlap in (False, True)]
if os.environ.get("AB_BLOCK_M"):
    VARIANTS = [v for v in VARIANTS if str(v[1]) in os.environ["AB_BLOCK_M"].split(",")]


def _tall_tiles(configs: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The GEMM settings with 8 warps (a 256-row accumulator does not fit 4 warps' registers);
    the weight gradients' are left out (they keep theirs)."""
    tall = {}
    for role, cfg in configs.items():
        if role.startswith("grad_w"):
            continue
        warps_at = 1 if role.endswith("_rows") else 2
        tall[role] = (*cfg[:warps_at], max(cfg[warps_at], 8), *cfg[warps_at + 1 :])
    return tall


def main() -> int:
    if not require_cuda(__file__):
        return 2
    names = sys.argv[1:] or ["moeut-244m-ffn", "ffn-128x128-k4", "large-64x4096-k2"]
    meta = metadata()
    results: dict[str, list[dict]] = {}
    lines = [f"moe_mlp schedule A/B, bf16, {environment_line(meta)}", ""]
    for name in names:
        s = next(s for s in SHAPES if s.name == name)
        t = make_inputs(s, "cuda")
        params = trained_tensors(t)
        grad = torch.randn(s.tokens, s.d_model, device="cuda", dtype=torch.bfloat16)
        dense_step = fwd_bwd_step(*dense_equal_flops(s, "cuda"))
        dense = median_ms(dense_step, warmup=10, rep=100, cuda_graph=True)
        rows = [{"variant": "dense (equal FLOPs)", "ms": dense, "pct_dense": 100.0}]

        first = None
        for overlap, block_m in VARIANTS:
            tall = None if block_m == 128 else _tall_tiles(moe_ops.GEMM_CONFIGS)
            launch = dict(_backward_overlap=overlap, block_m=block_m, gemm_configs=tall)
            out = ours_fused(s, t, True, **launch)
            out.backward(grad)
            got = [out.detach().float(), *[p.grad.float() for p in params]]
            for p in params:
                p.grad = None
            del out  # its autograd graph would tie the captured backward to the default stream
            first = first or got
            err = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(got, first))
            step = fwd_bwd_step(
                lambda launch=launch: ours_fused(s, t, True, **launch), params, grad
            )
            ms = median_ms(step, warmup=10, rep=100, cuda_graph=True)
            label = f"overlap={int(overlap)} block_m={block_m}"
            rows.append({"variant": label, "ms": ms, "pct_dense": 100 * dense / ms, "err": err})
        results[name] = rows
        lines += [
            f"== {name} ({flops(s) / 1e9:.0f} GFLOP)",
            *table_header("variant", "ms", "% of dense", "max rel. diff vs first"),
        ]
        for r in rows:
            err = f"{r['err']:.1e}" if "err" in r else "-"
            lines.append(f"| {r['variant']} | {r['ms']:.3f} | {r['pct_dense']:.0f}% | {err} |")
        lines.append("")
        print("\n".join(lines[-len(rows) - 4 :]), flush=True)
    document = {"meta": meta, "results": results}
    write_results("ab_moe_variants", document, "\n".join(lines), script_file=__file__, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
