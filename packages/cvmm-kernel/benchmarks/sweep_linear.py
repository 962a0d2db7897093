r"""Launch-setting sweep of moe_linear on SwitchHead's V and O shapes, whole forward + backward.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/cvmm-kernel/benchmarks/sweep_linear.py

For each shape of bench_cvmm.py that moe_linear serves, each role's candidate settings are tried
one role at a time, passed per call as ``moe_linear(..., gemm_configs={role: setting})`` (the
other roles at their shipped settings, ``moe_ops.GEMM_CONFIGS``): a forward + backward
captured in a CUDA graph, its replays timed with ``triton.testing.do_bench`` (median), the output
and gradients compared with the defaults'. Dense matmuls of equal FLOPs are timed in the same
process. Prints the best settings per role and shape; writes ``sweep_linear.json`` to ``$OUT``
(else ``benchmarks/results``).
"""

from __future__ import annotations

import sys

import torch
from bench_cvmm import (
    SHAPES,
    dense_equal_flops,
    fwd_bwd_step,
    make_inputs,
    ours_fused,
    trained_tensors,
)
from bench_harness import median_ms, metadata, require_cuda, write_results

GEMM = [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 4),
        (128, 32, 8, 4), (64, 128, 4, 3), (128, 64, 8, 3, True), (128, 64, 8, 5),
        (128, 64, 4, 5)]  # fmt: skip
ROWS = [(128, 8, 4), (128, 4, 4), (128, 8, 3), (128, 4, 2), (256, 8, 3), (64, 4, 4), (64, 4, 3),
        (64, 8, 4), (32, 4, 4)]  # fmt: skip
WGRAD = [(64, 128, 128, 4, 4), (64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (32, 64, 128, 4, 3),
         (64, 64, 64, 4, 3), (128, 64, 128, 8, 3), (64, 128, 128, 8, 3), (32, 128, 128, 4, 4),
         (32, 64, 64, 4, 4)]  # fmt: skip
CANDIDATES = {
    "linear": GEMM,
    "linear_rows": ROWS,
    "linear_grad_input": GEMM,
    "linear_grad_input_rows": ROWS,
    "grad_w_linear": WGRAD,
}


def time_step(s, t, params, grad, deterministic=True, gemm_configs=None):
    step = fwd_bwd_step(
        lambda: ours_fused(s, t, deterministic, gemm_configs=gemm_configs), params, grad
    )
    return median_ms(step, warmup=25, rep=100, cuda_graph=True)


def outputs(s, t, params, grad, gemm_configs=None):
    for p in params:
        p.grad = None
    out = ours_fused(s, t, True, gemm_configs=gemm_configs)
    out.backward(grad)
    return [out.detach().float()] + [p.grad.float() for p in params]


def main() -> int:
    if not require_cuda(__file__):
        return 2
    rows = []
    for s in [s for s in SHAPES if s.kind in ("v", "o")]:
        t = make_inputs(s, "cuda")
        params = trained_tensors(t)
        grad = torch.randn_like(ours_fused(s, t, True))
        dense_fn, dense_params = dense_equal_flops(s, "cuda")
        dense_ms = median_ms(fwd_bwd_step(dense_fn, dense_params), warmup=25, rep=100,
                             cuda_graph=True)  # fmt: skip
        base = outputs(s, t, params, grad)
        base_ms = time_step(s, t, params, grad)
        atomic_ms = time_step(s, t, params, grad, deterministic=False)
        print(f"== {s.name}: dense {dense_ms:.3f} ms, defaults {base_ms:.3f} ms "
              f"({100 * dense_ms / base_ms:.0f}%), atomic {atomic_ms:.3f}")  # fmt: skip
        for role, candidates in CANDIDATES.items():
            for cfg in candidates:
                configs = {role: cfg}  # this call's setting of the role, the others shipped
                try:
                    ms = time_step(s, t, params, grad, gemm_configs=configs)
                    got = outputs(s, t, params, grad, gemm_configs=configs)
                    diff = max(float((a - b).norm() / b.norm()) for a, b in zip(got, base))
                except Exception as exc:  # e.g. out of shared memory, a refused setting
                    ms, diff = None, f"{type(exc).__name__}: {exc}"[:200]
                rows.append({"shape": s.name, "role": role, "config": list(cfg), "ms": ms,
                             "rel_diff_vs_defaults": diff, "defaults_ms": base_ms,
                             "dense_ms": dense_ms, "atomic_ms": atomic_ms})  # fmt: skip
            timed = [r for r in rows if r["shape"] == s.name and r["role"] == role and r["ms"]]
            best = min(timed, key=lambda r: r["ms"])
            print(f"  {role}: best {tuple(best['config'])} {best['ms']:.3f} ms "
                  f"(diff {best['rel_diff_vs_defaults']:.1e})")  # fmt: skip
    meta = metadata(dtype="bfloat16", timing="do_bench median of CUDA-graph replays, fwd+bwd")
    write_results("sweep_linear", {"meta": meta, "rows": rows}, None, script_file=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
