r"""A/B of moe_mlp's forward in one kernel per tile (up projection, activation, down projection)
against the up projection's GEMM followed by the row-tile kernel (bf16, medians).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':')packages/cvmm-kernel/benchmarks \
        python3 packages/cvmm-kernel/benchmarks/ab_fused_forward.py

For each feedforward shape of ``bench_cvmm.py`` with an expert size up to 128: forward +
backward (CUDA-graph replays) and the forward alone, with ``moe_ops.FUSED_FORWARD`` on (each
setting of ``SETTINGS``, passed as ``gemm_configs={"fused_forward": ...}``) and off,
interleaved in one process, and how far the outputs and gradients differ. Writes
``ab_fused_forward.json`` to ``$OUT`` (else ``benchmarks/results``). An earlier run with
8-warp settings: ``ab_fused_forward_8warps.json``.
"""

from __future__ import annotations

import sys

import torch
from bench_harness import median_ms, metadata, require_cuda, write_results

# (BLOCK_K, BLOCK_N, num_warps, up stages, down stages)
SETTINGS = [(64, 128, 4, 3, 3), (64, 128, 4, 4, 3), (64, 128, 4, 3, 4), (64, 128, 4, 4, 4),
            (64, 128, 4, 2, 2), (32, 128, 4, 4, 3), (64, 64, 4, 4, 4), (128, 128, 4, 2, 3),
            (64, 128, 8, 4, 4)]  # fmt: skip


def main() -> int:
    if not require_cuda(__file__):
        return 2
    import bench_cvmm as B
    from cvmm_kernel import moe_ops

    rows = []
    for s in B.SHAPES:
        if s.kind != "ffn" or s.expert_size > 128:
            continue
        t = B.make_inputs(s, "cuda")
        params = B.trained_tensors(t)
        launch: dict = {}
        fn = lambda: B.ours_fused(s, t, True, **launch)

        def outputs():
            for p in params:
                p.grad = None
            out = fn()
            out.backward(torch.ones_like(out))
            return [v.detach().float().clone() for v in (out, *(p.grad for p in params))]

        moe_ops.FUSED_FORWARD[0] = False
        ref = outputs()
        variants = [("two kernels", False, None)]
        variants += [(f"fused {cfg}", True, cfg) for cfg in SETTINGS]
        variants += [("two kernels again", False, None)]
        for name, fused, cfg in variants:
            moe_ops.FUSED_FORWARD[0] = fused
            launch.clear()
            if cfg is not None:
                launch["gemm_configs"] = {"fused_forward": cfg}
            try:
                got = outputs()
                diff = max(float((a - b).norm() / b.norm().clamp_min(1e-30))
                           for a, b in zip(got, ref))  # fmt: skip
                step_ms = B.time_fwd_bwd(fn, params)[0]
                with torch.no_grad():
                    fwd_ms = median_ms(fn, warmup=25, rep=200, cuda_graph=True)
            except Exception as exc:  # out of resources
                rows.append({"shape": s.name, "variant": name, "error": str(exc)[:100]})
                print(f"{s.name:18s} {name:32s} failed: {str(exc)[:100]}")
                continue
            rows.append({"shape": s.name, "variant": name, "fwd_bwd_ms": step_ms,
                         "fwd_ms": fwd_ms, "max_rel_diff": diff})  # fmt: skip
            print(f"{s.name:18s} {name:32s} fwd+bwd {step_ms:.3f} fwd {fwd_ms:.3f} diff {diff:.1e}")
        moe_ops.FUSED_FORWARD[0] = True
        torch.cuda.empty_cache()
    write_results("ab_fused_forward", {"meta": metadata(), "rows": rows}, script_file=__file__,
                  indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
