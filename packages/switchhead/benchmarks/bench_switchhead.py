r"""Benchmark one SwitchHead attention layer against parameter-matched dense attention (CUDA).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/switchhead/benchmarks/bench_switchhead.py [--quick] [--compile] \
        [--cuda-graph] [--compiled-graph] [--variants "rope-4x4-d100,xl-4x4-d100"]

Forward + backward, bf16 autocast, B=8, d_model=1024, causal. In the same process: dense
multi-head attention with 16 heads x 64 (q/k/v/o linear layers + SDPA ``is_causal=True``).
Ratios are like for like: each row against the dense layer run the same way (eager, compiled,
replayed from a CUDA graph, or compiled and replayed from a CUDA graph as
``torch.compile(mode="reduce-overhead")`` would: the GPU-bound compiled step, without the host
time of the compiled graph's custom-op calls). ``--variants`` times only the named variants
(and the dense one). Writes JSON and a markdown table (``switchhead[_quick][_subset][_TAG]``) to
``$OUT`` if set, else to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from bench_harness import (
    environment_line,
    median_ms,
    metadata,
    peak_mib,
    ratios_to_baseline,
    require_cuda,
    table_header,
    write_results,
)
from switchhead import SwitchHeadRope, SwitchHeadXL

UPSTREAM_MS_T1024 = {"rope-4x4-d100": 8.46, "xl-4x4-d100": 8.73}  # PERF.md, H100
DENSE = "dense-mha-16x64"
MODE_LABELS = {
    "eager": "",
    "compiled": " (compiled)",
    "graph": " (CUDA graph)",
    "compiled-graph": " (compiled, CUDA graph)",
}


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
    yield (
        "rope-4x4-d100 cvmm experts",
        lambda: SwitchHeadRope(1024, 4, 4, d_head=100, expert_impl="cvmm"),
    )
    yield "rope-4x4-d128", lambda: SwitchHeadRope(1024, 4, 4, d_head=128)
    # 4 heads x 8 experts: where "auto" switches from the dense-gated to the sparse experts
    yield (
        "rope-4x8-d128 dense experts",
        lambda: SwitchHeadRope(1024, 4, 8, d_head=128, expert_impl="dense"),
    )
    yield (
        "rope-4x8-d128 cvmm experts",
        lambda: SwitchHeadRope(1024, 4, 8, d_head=128, expert_impl="cvmm"),
    )
    yield (
        "rope-4x10-d128 dense experts (MoEUT-244M's)",
        lambda: SwitchHeadRope(1024, 4, 10, d_head=128, expert_impl="dense"),
    )
    yield (
        "rope-4x10-d128 cvmm experts (MoEUT-244M's)",
        lambda: SwitchHeadRope(1024, 4, 10, d_head=128, expert_impl="cvmm"),
    )
    yield "xl-4x4-d100", lambda: SwitchHeadXL(1024, 4, 4, d_head=100)
    yield "xl-4x4-d100 reference", lambda: SwitchHeadXL(1024, 4, 4, d_head=100, backend="reference")
    yield "dense-mha-16x64", lambda: DenseMHA()


def time_layer(make, batch: int, seq: int, mode: str = "eager") -> dict:
    """``mode``: "eager", "compiled" (torch.compile), "graph" (each step a CUDA graph replay) or
    "compiled-graph" (both)."""
    torch.manual_seed(0)
    layer = make().cuda()
    if mode in ("compiled", "compiled-graph"):
        layer = torch.compile(layer)
    x = torch.randn(batch, seq, 1024, device="cuda", requires_grad=True)
    dense = isinstance(getattr(layer, "_orig_mod", layer), DenseMHA)
    graph = mode in ("graph", "compiled-graph")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graph):
            out = layer(x) if dense else layer(x, x, x)[0]
        out.float().sum().backward()
        layer.zero_grad(set_to_none=not graph)
        x.grad = None

    step()
    peak = peak_mib(step)
    ms = median_ms(step, warmup=25, rep=100, cuda_graph=graph)
    params = sum(p.numel() for p in layer.parameters())
    return {"ms": ms, "peak_mib": peak, "params": params}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T=1024 only")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd layers")
    parser.add_argument(
        "--cuda-graph", action="store_true", help="also time steps replayed from a CUDA graph"
    )
    parser.add_argument(
        "--compiled-graph",
        action="store_true",
        help="also time torch.compile'd steps replayed from a CUDA graph",
    )
    parser.add_argument("--variants", help="comma-separated variant names (default: all)")
    parser.add_argument("--tag", help="suffix of the result files' names")
    args = parser.parse_args()
    if not require_cuda(__file__):
        return 2
    names = [name for name, _ in variants()]
    chosen = names if args.variants is None else [*args.variants.split(","), DENSE]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {names}")
    modes = [
        "eager",
        *(["compiled"] if args.compile else []),
        *(["graph"] if args.cuda_graph else []),
        *(["compiled-graph"] if args.compiled_graph else []),
    ]
    rows = []
    for seq in [1024] if args.quick else [1024, 4096]:
        group = []
        for name, make in variants():
            if name not in chosen:
                continue
            for mode in modes:
                if mode.startswith("compiled") and name.endswith("reference"):
                    continue
                try:
                    result = time_layer(make, 8, seq, mode)
                except Exception as exc:  # report a variant that cannot be captured
                    if not mode.endswith("graph"):
                        raise
                    print(f"{name} CUDA graph: {exc!r}"[:300], file=sys.stderr)
                    continue
                label = name + MODE_LABELS[mode]
                group.append({"variant": label, "T": seq, "mode": mode, **result})
        # like for like: against the dense layer run the same way
        is_dense = lambda row: row["variant"] == DENSE + MODE_LABELS[row["mode"]]
        ratios = ratios_to_baseline(group, key="ms", is_baseline=is_dense, match=("mode",))
        for row, ratio in zip(group, ratios):
            row["ratio_to_dense"] = ratio
        for row in group:
            if seq == 1024 and row["variant"] in UPSTREAM_MS_T1024:
                row["upstream_ms_perf_md"] = UPSTREAM_MS_T1024[row["variant"]]
        rows += group
        torch.cuda.empty_cache()
    meta = metadata(
        setup="B=8, d_model=1024, causal, bf16 autocast, forward+backward, do_bench median"
    )
    lines = [
        f"SwitchHead layer, {environment_line(meta)} ({meta['setup']})",
        "",
        *table_header(
            "variant",
            "T",
            "params",
            "ms",
            "x dense (same mode)",
            "peak MiB",
            "upstream ms (PERF.md)",
        ),
    ]
    for r in rows:
        up = r.get("upstream_ms_perf_md")
        lines.append(
            f"| {r['variant']} | {r['T']} | {r['params'] / 1e6:.2f}M | {r['ms']:.3f} | "
            f"{r['ratio_to_dense']:.2f} | {r['peak_mib']:.0f} | {'' if up is None else up} |"
        )
    table = "\n".join(lines)
    print(table)
    stem = "switchhead_quick" if args.quick else "switchhead"
    stem += "" if args.variants is None else "_subset"
    stem += f"_{args.tag}" if args.tag else ""
    write_results(stem, {"meta": meta, "rows": rows}, table, script_file=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
