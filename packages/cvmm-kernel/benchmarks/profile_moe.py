r"""Where one moe_mlp forward + backward spends its time (CUDA): kernels, host, graph replay.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/cvmm-kernel/benchmarks/profile_moe.py [shape ...]

For each FFN shape of bench_cvmm.py: eager time, CUDA-graph replay time (the GPU-bound floor:
no host overhead), the dense baseline both ways, and a torch.profiler table of the CUDA kernels
of one step. Writes ``profile_moe.txt`` to ``$OUT`` (else ``benchmarks/results``).
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
from bench_harness import (
    environment_line,
    host_us,
    median_ms,
    metadata,
    require_cuda,
    write_text,
)


def host_times(s, t) -> dict[str, float]:
    from cvmm_kernel import moe_ops
    from cvmm_kernel import moe_triton as kt

    flat = t["index"].reshape(-1)
    routing = moe_ops.moe_routing(flat, s.n_experts, moe_ops.BLOCK_M, "triton")
    r = moe_ops.Routing(*routing, moe_ops.BLOCK_M)
    x, w = t["x"], t["up"].detach()
    h = x.new_empty(flat.numel(), s.expert_size)
    cfg = moe_ops._config("up", s.d_model, s.expert_size)
    gate = t["gate"].reshape(-1)
    return {
        "torch empty + add (baseline op)": host_us(lambda: x.new_empty(4).add_(1)),
        "routing op (3 launches)": host_us(
            lambda: moe_ops.moe_routing(flat, s.n_experts, moe_ops.BLOCK_M, "triton")
        ),
        "build_routing (no custom op)": host_us(
            lambda: kt.build_routing(flat, s.n_experts, moe_ops.BLOCK_M, r.tile_expert.numel())
        ),
        "one moe_gemm launch": host_us(
            lambda: kt.moe_gemm(
                x,
                w,
                h,
                r,
                s.k,
                a_gather=True,
                out_mode=kt.OUT_SORTED,
                epilogue=kt.EPI_ACTIVATION,
                activation="relu",
                config=cfg,
            )
        ),
        "forward op, no grad": host_us(
            lambda: moe_ops.moe_mlp_forward(
                x,
                gate,
                w,
                t["down"].detach(),
                *routing,
                s.k,
                moe_ops.BLOCK_M,
                "relu",
                True,
                "triton",
            )
        ),
        "moe_mlp forward, no grad": host_us(
            lambda: ours_fused(s, {**t, "up": w, "down": t["down"].detach()}, True)
        ),
    }


def main() -> int:
    if not require_cuda(__file__):
        return 2
    names = sys.argv[1:] or ["moeut-244m-ffn"]
    lines = [f"moe_mlp profile, {environment_line(metadata())}"]
    for name in names:
        s = next(s for s in SHAPES if s.name == name)
        t = make_inputs(s, "cuda")
        params = trained_tensors(t)
        grad = torch.randn(s.tokens, s.d_model, device="cuda", dtype=torch.bfloat16)

        step = fwd_bwd_step(lambda: ours_fused(s, t, True), params, grad)
        atomic_step = fwd_bwd_step(lambda: ours_fused(s, t, False), params, grad)
        dense_step = fwd_bwd_step(*dense_equal_flops(s, "cuda"))

        def fwd_only():
            with torch.no_grad():
                ours_fused(s, t, True)

        bench = lambda f, graph=False: median_ms(f, warmup=10, rep=100, cuda_graph=graph)
        rows = {
            "moe_mlp eager": bench(step),
            "moe_mlp forward only, eager": bench(fwd_only),
            "moe_mlp atomic eager": bench(atomic_step),
            "moe_mlp CUDA graph": bench(step, graph=True),
            "moe_mlp atomic CUDA graph": bench(atomic_step, graph=True),
            "dense eager": bench(dense_step),
            "dense CUDA graph": bench(dense_step, graph=True),
        }
        lines.append(f"\n== {name}")
        for k, v in rows.items():
            lines.append(f"{k:32s} {v:8.3f} ms")
        lines.append("host time per call (no sync, median of 5 x 50 calls):")
        for label, us in host_times(s, t).items():
            lines.append(f"  {label:40s} {us:8.1f} us")
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
        ) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        lines.append("kernel time per step (5 steps profiled):")
        lines.append(
            prof.key_averages().table(
                sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60
            )
        )
        print("\n".join(lines[-30:]))
    write_text("profile_moe.txt", "\n".join(lines), script_file=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
