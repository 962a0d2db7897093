r"""Launch settings of moe_mlp's backward that let the input gradient and the weight gradients
share the SMs (bf16, forward + backward, CUDA-graph replays, medians).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':')packages/cvmm-kernel/benchmarks \
        python3 packages/cvmm-kernel/benchmarks/sweep_backward_overlap.py [shape ...]

The backward runs the input gradient (row-tile products, then the k-sum) on a side stream while
the weight gradients run on the main one. With the shipped settings each of these kernels takes
most of an SM's shared memory, so the two streams only take turns on the SMs (in one step their
kernel times add up to about the step's time). Here fewer pipeline stages (less shared memory)
for the products and the weight gradients are tried together, to see whether a product program
and a weight-gradient program on one SM overlap enough to pay for the shallower pipelines.
Measured on an H100 (sweep_backward_overlap.json): no; the side stream saves 4% of the step
with the shipped settings, and no other setting saved more than 0.5% more. Each
setting is passed per call (``moe_mlp(..., gemm_configs=)``); the shipped settings are timed
first and last, and without the side stream. Writes ``sweep_backward_overlap.json`` to ``$OUT``
(else ``benchmarks/results``).
"""

from __future__ import annotations

import itertools
import sys

import torch
from bench_harness import metadata, require_cuda, write_results

# Row-tile settings. The committed JSON also has persistent ones (a fourth field: one program
# per SM, so that a grid of one program per tile does not fill every SM before the weight
# gradients get room), measured with a kernel option since removed: 1-8% slower.
ROWS = [(128, 8, 4), (128, 8, 2), (128, 4, 3), (128, 4, 2)]
W_UP = [(64, 128, 128, 4, 4), (64, 128, 128, 4, 3), (64, 128, 128, 4, 2)]
W_DOWN = [(128, 128, 128, 4, 3), (128, 128, 128, 4, 2), (64, 128, 128, 4, 2)]


def main() -> int:
    if not require_cuda(__file__):
        return 2
    import bench_cvmm as B

    only = set(sys.argv[1:]) or {"moeut-244m-ffn"}
    results = {}
    for s in B.SHAPES:
        if s.name not in only:
            continue
        t = B.make_inputs(s, "cuda")
        params = B.trained_tensors(t)
        dense = B.time_fwd_bwd(*B.dense_equal_flops(s, "cuda"))[0]

        def timed(**launch) -> float:
            fn = lambda: B.ours_fused(s, t, True, **launch)
            return B.time_fwd_bwd(fn, params)[0]

        rows = [{"setting": "shipped", "ms": timed()}]
        rows.append({"setting": "shipped, no side stream", "ms": timed(_backward_overlap=False)})
        for rows_cfg, up_cfg, down_cfg in itertools.product(ROWS, W_UP, W_DOWN):
            configs = {"grad_input_rows": rows_cfg, "grad_w_up": up_cfg, "grad_w_down": down_cfg}
            try:
                ms = timed(gemm_configs=configs)
            except Exception as exc:  # out of resources
                rows.append({"setting": configs, "error": str(exc)[:80]})
                continue
            rows.append({"setting": configs, "ms": ms})
        rows.append({"setting": "shipped again", "ms": timed()})
        base = min(r["ms"] for r in rows if r["setting"] in ("shipped", "shipped again"))
        for r in rows:
            if "ms" in r:
                r["vs_shipped"] = r["ms"] / base
                r["pct_of_dense"] = dense / r["ms"]
        best = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])[:8]
        print(f"== {s.name}: dense {dense:.3f} ms, shipped {base:.3f} ms ({dense / base:.1%})")
        for r in best + [r for r in rows if isinstance(r["setting"], str)]:
            print(f"  {r['ms']:.3f} ms x{r['vs_shipped']:.3f} ({r['pct_of_dense']:.1%}) "
                  f"{r['setting']}")  # fmt: skip
        results[s.name] = {"dense_ms": dense, "rows": rows}
        torch.cuda.empty_cache()
    write_results("sweep_backward_overlap", {"meta": metadata(), "results": results},
                  script_file=__file__, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
