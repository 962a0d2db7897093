"""Where one moe_mlp forward + backward spends its time (CUDA): kernels, host, graph replay.

    PYTHONPATH=packages/cvmm-kernel/src python3 packages/cvmm-kernel/benchmarks/profile_moe.py

For each FFN shape of bench_cvmm.py: eager time, CUDA-graph replay time (the GPU-bound floor:
no host overhead), the dense baseline both ways, and a torch.profiler table of the CUDA kernels
of one step. Writes ``profile_moe.txt`` to ``$OUT`` (else ``benchmarks/results``).
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import torch
import triton
import triton.testing
from bench_cvmm import SHAPES, dense_equal_flops, make_inputs, ours_moe_mlp


def graph_ms(step) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median")


def main() -> int:
    names = sys.argv[1:] or ["moeut-244m-ffn"]
    lines = [
        f"moe_mlp profile, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {triton.__version__}, {datetime.date.today().isoformat()}",
    ]
    for name in names:
        s = next(s for s in SHAPES if s.name == name)
        t = make_inputs(s, "cuda")
        params = [t[k].requires_grad_() for k in ("up", "down")]
        grad = torch.randn(s.tokens, s.d_model, device="cuda", dtype=torch.bfloat16)

        def step(det=True):
            out = ours_moe_mlp(s, t, det)
            out.backward(grad)
            for p in params:
                p.grad = None

        dense_fn, dense_params = dense_equal_flops(s, "cuda")

        def dense_step():
            out = dense_fn()
            out.backward(torch.ones_like(out))
            for p in dense_params:
                p.grad = None

        def fwd_only():
            with torch.no_grad():
                ours_moe_mlp(s, t, True)

        bench = lambda f: triton.testing.do_bench(f, warmup=10, rep=100, return_mode="median")
        rows = {
            "moe_mlp eager": bench(step),
            "moe_mlp forward only, eager": bench(fwd_only),
            "moe_mlp atomic eager": bench(lambda: step(False)),
            "moe_mlp CUDA graph": graph_ms(step),
            "moe_mlp atomic CUDA graph": graph_ms(lambda: step(False)),
            "dense eager": bench(dense_step),
            "dense CUDA graph": graph_ms(dense_step),
        }
        lines.append(f"\n== {name}")
        for k, v in rows.items():
            lines.append(f"{k:32s} {v:8.3f} ms")
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
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "profile_moe.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
