"""Benchmark flash_attention_n (forward + backward, CUDA) against SDPA in the same process.

    PYTHONPATH=packages/softmax-n/src python3 packages/softmax-n/benchmarks/bench_softmax_n.py

    (add --quick for the headline shapes only)

B=8, H=16, D in {64, 128}, L in {1024, 2048, 8192}, causal and not, bf16 and fp16. Columns: SDPA
with its default backend choice (n=0) and with the flash backend forced, ours with n=1 and
n=0.5 (``backend="auto"``), ours through the fused Triton kernel (n=1), and the upstream package
``flash-attention-softmax-n`` (n=1) where it is importable. Peak memory is
``torch.cuda.max_memory_allocated`` during one step, above the inputs. Writes JSON and markdown
to ``$OUT`` if set, else to ``benchmarks/results/``.
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


def measure(fn, q, k, v) -> tuple[float, float]:
    """(median ms of forward + backward, peak MiB above the inputs)."""
    import triton.testing

    grad = torch.randn_like(q)

    def step():
        out = fn(q, k, v)
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median"), peak


def upstream():
    try:
        from flash_attention_softmax_n import flash_attention_n as upstream_fn
    except Exception as e:  # not installed, or fails to import
        return None, f"upstream not importable: {type(e).__name__}: {e}"
    return upstream_fn, "upstream flash-attention-softmax-n imported"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the headline shapes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_softmax_n.py needs a CUDA device (none found)", file=sys.stderr)
        return 2
    import triton
    from softmax_n import flash_attention_n
    from torch.nn.attention import SDPBackend, sdpa_kernel

    upstream_fn, note = upstream()
    print(note)
    shapes = [(64, 2048, True, torch.bfloat16), (128, 2048, True, torch.bfloat16)]
    if not args.quick:
        shapes = [
            (d, length, causal, dtype)
            for dtype in (torch.bfloat16, torch.float16)
            for d in (64, 128)
            for length in (1024, 2048, 8192)
            for causal in (True, False)
        ]

    def sdpa_flash(q, k, v, causal):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    rows = []
    for d, length, causal, dtype in shapes:
        q, k, v = (
            torch.randn(8, 16, length, d, device="cuda", dtype=dtype, requires_grad=True)
            for _ in range(3)
        )
        variants = {
            "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            "sdpa_flash": lambda q, k, v: sdpa_flash(q, k, v, causal),
            "n1": lambda q, k, v: flash_attention_n(q, k, v, 1.0, is_causal=causal),
            "n0.5": lambda q, k, v: flash_attention_n(q, k, v, 0.5, is_causal=causal),
            "triton_n1": lambda q, k, v: flash_attention_n(
                q, k, v, 1.0, is_causal=causal, backend="triton"
            ),
        }
        if upstream_fn is not None:
            variants["upstream_n1"] = lambda q, k, v: upstream_fn(
                q, k, v, softmax_n_param=1, is_causal=causal
            )
        row = {"D": d, "L": length, "causal": causal, "dtype": str(dtype).split(".")[-1]}
        for name, fn in variants.items():
            try:
                ms, mib = measure(fn, q, k, v)
            except Exception as e:  # e.g. upstream out of memory: recorded, not fatal
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:120]}"
                ms = mib = float("nan")
                torch.cuda.empty_cache()
            row[f"{name}_ms"], row[f"{name}_mib"] = ms, mib
        for name in variants:
            row[f"{name}_ratio"] = row[f"{name}_ms"] / row["sdpa_ms"]
        rows.append(row)
        print(row, flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "date": datetime.date.today().isoformat(),
        "setup": "B=8, H=16, forward+backward, triton.testing.do_bench median",
        "upstream": note,
    }
    fmt = lambda r, name: (
        "-" if f"{name}_ms" not in r or r[f"{name}_ms"] != r[f"{name}_ms"]
        else f"{r[f'{name}_ms']:.3f} ({r[f'{name}_ratio']:.2f}x)"
    )  # fmt: skip
    lines = [
        f"flash_attention_n, {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, "
        f"cuDNN {meta['cudnn']}, {meta['date']} ({meta['setup']}); ratios are to SDPA (default "
        "backend, n=0) in the same run",
        "",
        "| dtype | D | L | causal | SDPA ms | SDPA flash | ours n=1 | ours n=0.5 | Triton n=1 | "
        "upstream n=1 | peak MiB SDPA / ours n=1 / upstream |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        up_mib = r.get("upstream_n1_mib", float("nan"))
        lines.append(
            f"| {r['dtype']} | {r['D']} | {r['L']} | {r['causal']} | {r['sdpa_ms']:.3f} | "
            f"{fmt(r, 'sdpa_flash')} | {fmt(r, 'n1')} | {fmt(r, 'n0.5')} | {fmt(r, 'triton_n1')} | "
            f"{fmt(r, 'upstream_n1')} | {r['sdpa_mib']:.0f} / {r['n1_mib']:.0f} / "
            f"{'-' if up_mib != up_mib else f'{up_mib:.0f}'} |"
        )
    table = "\n".join(lines)
    print(table)
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "softmax_n_quick" if args.quick else "softmax_n"
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out_dir / f"{stem}.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
