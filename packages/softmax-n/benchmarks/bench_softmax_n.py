r"""Benchmark flash_attention_n against SDPA flash attention (CUDA), forward + backward.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/softmax-n/benchmarks/bench_softmax_n.py [--quick] [--rounds R]

B=8, H=16, D in {64, 128}, L in {1024, 2048, 8192}, causal and not, bf16 and fp16; ours with
n=1, n=0.5 and attention sinks (one learnable logit per head), and the fused Triton kernel with
n=1, against, in the same process, SDPA (n=0) with PyTorch's choice of kernel (cuDNN on an
H100), SDPA restricted to the flash kernel, and the upstream ``flash-attention-softmax-n``
package (n=1) when it is importable. Writes JSON and markdown to ``$OUT`` if set, else to
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from bench_harness import (
    environment_line,
    median_ms,
    metadata,
    peak_mib,
    require_cuda,
    table_header,
    write_results,
)
from softmax_n import flash_attention_n, flash_attention_n_triton
from torch.nn.attention import SDPBackend, sdpa_kernel


def measure(fn, q, k, v) -> tuple[float, float]:
    """(median ms, peak MiB) of forward + backward."""

    def step():
        out = fn(q, k, v)
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None

    step()
    peak = peak_mib(step)
    return median_ms(step, warmup=25, rep=100), peak


def graph_ms(fn, q, k, v) -> float | None:
    """Median ms of forward + backward replayed from a CUDA graph (None if it cannot be
    captured: reported, not hidden)."""

    def step():
        out = fn(q, k, v)
        out.backward(torch.ones_like(out))

    try:
        ms = median_ms(step, warmup=25, rep=100, cuda_graph=True)
    except Exception as exc:
        print(f"CUDA-graph capture failed: {exc!r}"[:300], file=sys.stderr)
        return None
    finally:
        q.grad = k.grad = v.grad = None
    return ms


def graphs(r: dict) -> str:
    times = [r.get(f"{key}_graph_ms") for key in ("sdpa", "n1.0", "sink")]
    if None in times:
        return "-"
    sdpa, n1, sink = times
    return f"{sdpa:.3f} / {n1:.3f} / {sink:.3f} ({sink / sdpa:.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the headline shape")
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="SDPA, n=1 and sinks are timed alternately this many times; the table shows the "
        "medians (launch-bound shapes vary by 10-20%% between single timings)",
    )
    args = parser.parse_args()
    if not require_cuda(__file__):
        return 2
    shapes = [(64, 2048, True, torch.bfloat16)]
    if not args.quick:
        shapes = [
            (d, length, causal, dtype)
            for dtype in (torch.bfloat16, torch.float16)
            for d in (64, 128)
            for length in (1024, 2048, 8192)
            for causal in (True, False)
        ]
    try:
        from flash_attention_softmax_n import flash_attention_n as upstream
    except Exception as exc:
        print(f"upstream flash-attention-softmax-n not importable: {exc!r}", file=sys.stderr)
        upstream = None
    rounds = max(1, args.rounds)
    rows = []
    for d, length, causal, dtype in shapes:
        q, k, v = (
            torch.randn(8, 16, length, d, device="cuda", dtype=dtype, requires_grad=True)
            for _ in range(3)
        )

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        def ours(n, fn=flash_attention_n):
            return lambda q, k, v: fn(q, k, v, n, is_causal=causal)

        # attention sinks: one learnable logit per head (its gradient included)
        sink = torch.zeros(16, device="cuda", requires_grad=True)

        def sinks(q, k, v):
            return flash_attention_n(q, k, v, is_causal=causal, sink=sink)

        # SDPA, n=1 and sinks interleaved, so drift hits them alike: (ms, MiB) per round
        runs = [
            tuple(measure(fn, q, k, v) for fn in (sdpa, ours(1.0), sinks)) for _ in range(rounds)
        ]
        sdpa_times, n1_times, sink_times = ([run[i][0] for run in runs] for i in range(3))
        sdpa_ms, n1_ms = statistics.median(sdpa_times), statistics.median(n1_times)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            flash_ms, _ = measure(sdpa, q, k, v)
        row = {
            "D": d,
            "L": length,
            "causal": causal,
            "dtype": str(dtype).split(".")[-1],
            "sdpa_ms": sdpa_ms,
            "sdpa_mib": runs[0][0][1],
            "sdpa_flash_ms": flash_ms,
            "upstream_n1_ms": None,
        }
        if upstream is not None and not (length == 8192 and d == 128):
            try:
                row["upstream_n1_ms"], row["upstream_n1_mib"] = measure(
                    lambda q, k, v: upstream(q, k, v, 1, is_causal=causal), q, k, v
                )
            except Exception as exc:  # report, do not hide, what upstream cannot run
                row["upstream_error"] = repr(exc)[:200]
                torch.cuda.empty_cache()
        row["sdpa_ms_runs"], row["n1.0_ms_runs"] = sdpa_times, n1_times
        row["n1.0_ms"], row["n1.0_mib"], row["n1.0_ratio"] = n1_ms, runs[0][1][1], n1_ms / sdpa_ms
        ms, mib = measure(ours(0.5), q, k, v)
        row["n0.5_ms"], row["n0.5_mib"], row["n0.5_ratio"] = ms, mib, ms / sdpa_ms
        row["triton_n1_ms"], row["triton_n1_mib"] = measure(
            ours(1.0, flash_attention_n_triton), q, k, v
        )
        # GPU-bound times: each step replayed from a CUDA graph (no host launch cost)
        for key, fn in (("sdpa", sdpa), ("n1.0", ours(1.0)), ("sink", sinks)):
            row[f"{key}_graph_ms"] = graph_ms(fn, q, k, v)
        ms, row["sink_ms_runs"] = statistics.median(sink_times), sink_times
        row["sink_ms"], row["sink_mib"], row["sink_ratio"] = ms, runs[0][2][1], ms / sdpa_ms
        rows.append(row)
        del q, k, v
        torch.cuda.empty_cache()
    meta = metadata(
        setup=f"B=8, H=16, forward+backward, do_bench median; SDPA, n=1 and sinks: median "
        f"of {rounds} interleaved timings; SDPA = PyTorch's kernel choice"
    )
    lines = [
        f"flash_attention_n, {environment_line(meta)} ({meta['setup']})",
        "",
        *table_header(
            "dtype",
            "D",
            "L",
            "causal",
            "SDPA ms",
            "SDPA flash-only ms",
            "n=1 ms (x SDPA)",
            "n=0.5 ms",
            "sinks ms (x SDPA)",
            "Triton n=1 ms",
            "upstream n=1 ms",
            "peak MiB SDPA / n=1 / sinks",
            "CUDA graph ms SDPA / n=1 / sinks (sinks x SDPA)",
        ),
    ]
    for r in rows:
        up = r["upstream_n1_ms"]
        up = f"{up:.3f}" if up is not None else ("error" if "upstream_error" in r else "-")
        lines.append(
            f"| {r['dtype']} | {r['D']} | {r['L']} | {r['causal']} | {r['sdpa_ms']:.3f} | "
            f"{r['sdpa_flash_ms']:.3f} | {r['n1.0_ms']:.3f} ({r['n1.0_ratio']:.2f}) | "
            f"{r['n0.5_ms']:.3f} | {r['sink_ms']:.3f} ({r['sink_ratio']:.2f}) | "
            f"{r['triton_n1_ms']:.3f} | {up} | "
            f"{r['sdpa_mib']:.0f} / {r['n1.0_mib']:.0f} / {r['sink_mib']:.0f} | {graphs(r)} |"
        )
    table = "\n".join(lines)
    table += (
        "\n\nEager times include the host's launch cost; the CUDA-graph column is the "
        "GPU-bound time of the same forward + backward."
    )
    print(table)
    stem = "softmax_n_quick" if args.quick else "softmax_n"
    write_results(stem, {"meta": meta, "rows": rows}, table, script_file=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
