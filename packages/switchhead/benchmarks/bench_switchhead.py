"""Benchmark one SwitchHead attention layer against parameter-matched dense attention (CUDA).

    PYTHONPATH=packages/cvmm-kernel/src:packages/switchhead/src \
        python3 packages/switchhead/benchmarks/bench_switchhead.py [--quick]

Forward + backward, bf16 autocast, B=8, d_model=1024, causal. In the same process: dense
multi-head attention with 16 heads x 64 (q/k/v/o linear layers + SDPA ``is_causal=True``).
Writes JSON and a markdown table to ``$OUT`` if set, else to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from switchhead import SwitchHeadRope, SwitchHeadXL

UPSTREAM_MS_T1024 = {"rope-4x4-d100": 8.46, "xl-4x4-d100": 8.73}  # PERF.md, H100


class DenseMHA(torch.nn.Module):
    """Standard causal multi-head attention with fused SDPA."""

    def __init__(self, d_model: int = 1024, n_heads: int = 16):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = torch.nn.Linear(d_model, 3 * d_model, bias=False)
        self.o = torch.nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(b, t, d))


def variants():
    yield "rope-4x4-d100", lambda: SwitchHeadRope(1024, 4, 4, d_head=100)
    yield "rope-4x4-d128", lambda: SwitchHeadRope(1024, 4, 4, d_head=128)
    yield "xl-4x4-d100", lambda: SwitchHeadXL(1024, 4, 4, d_head=100)
    yield "xl-4x4-d100 reference", lambda: SwitchHeadXL(1024, 4, 4, d_head=100, backend="reference")
    yield "dense-mha-16x64", lambda: DenseMHA()


def cuda_graphed(step):
    """``step`` captured once in a CUDA graph (after warm-up on a side stream): the replay
    removes the host's launch overhead, which shows the GPU-bound time of the step."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def time_layer(make, batch: int, seq: int, mode: str = "eager") -> dict:
    """``mode``: "eager", "compiled" (torch.compile) or "graph" (each step a CUDA graph replay)."""
    import triton.testing

    torch.manual_seed(0)
    layer = make().cuda()
    if mode == "compiled":
        layer = torch.compile(layer)
    x = torch.randn(batch, seq, 1024, device="cuda", requires_grad=True)
    dense = isinstance(getattr(layer, "_orig_mod", layer), DenseMHA)
    graph = mode == "graph"

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graph):
            out = layer(x) if dense else layer(x, x, x)[0]
        out.float().sum().backward()
        layer.zero_grad(set_to_none=not graph)
        x.grad = None

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    if graph:
        step = cuda_graphed(step)
    ms = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
    params = sum(p.numel() for p in layer.parameters())
    return {"ms": ms, "peak_mib": peak, "params": params}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T=1024 only")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd layers")
    parser.add_argument(
        "--cuda-graph", action="store_true", help="also time steps replayed from a CUDA graph"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_switchhead.py needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    rows = []
    for seq in [1024] if args.quick else [1024, 4096]:
        dense = None
        results = {}
        for name, make in variants():
            results[name] = time_layer(make, 8, seq)
            if args.compile and not name.endswith("reference"):
                results[name + " (compiled)"] = time_layer(make, 8, seq, "compiled")
            if args.cuda_graph:
                try:
                    results[name + " (CUDA graph)"] = time_layer(make, 8, seq, "graph")
                except Exception as exc:  # report a variant that cannot be captured
                    print(f"{name} CUDA graph: {exc!r}"[:300], file=sys.stderr)
        dense = results["dense-mha-16x64"]["ms"]
        for name, r in results.items():
            row = {"variant": name, "T": seq, **r, "ratio_to_dense": r["ms"] / dense}
            if seq == 1024 and name in UPSTREAM_MS_T1024:
                row["upstream_ms_perf_md"] = UPSTREAM_MS_T1024[name]
            rows.append(row)
        torch.cuda.empty_cache()
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
        "setup": "B=8, d_model=1024, causal, bf16 autocast, forward+backward, do_bench median",
    }
    lines = [
        f"SwitchHead layer, {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, "
        f"{meta['date']} ({meta['setup']})",
        "",
        "| variant | T | params | ms | x dense time | peak MiB | upstream ms (PERF.md) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        up = r.get("upstream_ms_perf_md")
        lines.append(
            f"| {r['variant']} | {r['T']} | {r['params'] / 1e6:.2f}M | {r['ms']:.3f} | "
            f"{r['ratio_to_dense']:.2f} | {r['peak_mib']:.0f} | {'' if up is None else up} |"
        )
    table = "\n".join(lines)
    print(table)
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "switchhead_quick" if args.quick else "switchhead"
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out_dir / f"{stem}.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
