r"""Kernel time of ``moe_linear`` at SwitchHead's V and O shapes, and a dense-gated k-sum.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/cvmm-kernel/benchmarks/profile_linear.py > profile_linear.txt

For each V/O shape of ``bench_cvmm.py``: the CUDA-graph time of a forward + backward, the
torch.profiler kernel table of five eager steps, and the time of the dense-gated alternative
to the per-slot products and their k-sum (the slots' rows scattered into ``[T, E * w]``, one
GEMM against all experts' matrices stacked: E/k times the FLOPs, no products written).
"""

from __future__ import annotations

import sys

import bench_cvmm as B
import torch
from bench_harness import median_ms, require_cuda
from torch.profiler import ProfilerActivity, profile


def main() -> int:
    if not require_cuda(__file__):
        return 2
    for s in B.SHAPES:
        if s.kind == "ffn":
            continue
        t = B.make_inputs(s, "cuda")
        params = B.trained_tensors(t)
        step = B.fwd_bwd_step(lambda: B.ours_fused(s, t, True), params)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(
            "==",
            s.name,
            "graph ms",
            round(B.time_fwd_bwd(lambda: B.ours_fused(s, t, True), params)[0], 3),
        )
        print(
            prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=14, max_name_column_width=60
            )
        )
        # dense-gated k-sum: rows scattered into [T, E*w] then one GEMM against all experts
        E = s.n_experts * s.heads
        T = s.tokens
        n = T * s.heads * s.k
        dt = torch.bfloat16
        rows = torch.randn(n, s.expert_size, device="cuda", dtype=dt)
        col = (t["index"].reshape(T, -1)).long()  # [T, H*k] expert of each slot
        wall = torch.randn(E * s.expert_size, s.d_model, device="cuda", dtype=dt)

        def dense_gated():
            full = torch.zeros(T, E, s.expert_size, device="cuda", dtype=dt)
            full.scatter_(
                1, col.unsqueeze(-1).expand(-1, -1, s.expert_size), rows.view(T, -1, s.expert_size)
            )
            return full.view(T, -1) @ wall

        ms = median_ms(dense_gated, warmup=20, rep=100)
        full = torch.zeros(T, E * s.expert_size, device="cuda", dtype=dt)
        mm = median_ms(lambda: full @ wall, warmup=20, rep=100)
        print(f"dense-gated k-sum: scatter+GEMM {ms * 1e3:.1f} us (GEMM alone {mm * 1e3:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
