r"""Benchmark flex_attention_n (softmax_n on FlexAttention) against the reference path (CUDA),
forward + backward.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/softmax-n/benchmarks/bench_flex.py [--window W] [--docs N] [--seed S]

bf16, B=8, H=16, L=2048, D=64, n=1, in one process: ``flex_attention_n`` (compiled
FlexAttention plus the gate ``sigmoid(lse - log n)``) with a causal sliding-window block mask and
with a packed-documents block mask (causal within each document), against the package's
reference path (``slow_attention_n``, which ``flash_attention_n`` also takes for masks on CUDA)
with the equivalent dense boolean mask; for plain causal attention also against the fused paths
(``flash_attention_n``: cuDNN / FlashAttention plus the gate; ``flash_attention_n_triton``) and
against FlexAttention itself without the gate (softmax, no lse), which shows the gate's cost.
Timings are medians of ``triton.testing.do_bench``; peak memory is what one step allocates
beyond its inputs. Writes JSON and markdown to ``$OUT`` if set, else to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
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

B, H, L, D = 8, 16, 2048, 64


def measure(fn, q, k, v) -> tuple[float, float]:
    """(median ms, peak MiB) of forward + backward."""

    def step():
        out = fn(q, k, v)
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None

    step()  # compiles (FlexAttention, block masks) outside the timing
    peak = peak_mib(step)
    return median_ms(step, warmup=25, rep=100), peak


def document_ids(n_docs: int, generator: torch.Generator) -> torch.Tensor:
    """``[B, L]`` document index of each position: ``n_docs`` documents of random lengths
    (at least 16 tokens) per sequence."""
    rows = []
    for _ in range(B):
        cuts = torch.randperm(L // 16 - 1, generator=generator)[: n_docs - 1].add(1).sort()
        bounds = [0, *(cuts.values * 16).tolist(), L]
        rows.append(
            torch.cat(
                [torch.full((e - s,), i) for i, (s, e) in enumerate(itertools.pairwise(bounds))]
            )
        )
    return torch.stack(rows)


def report(rows: list[dict]) -> None:
    """Print the table; write ``flex.json`` and ``flex.md`` to ``$OUT`` or ``results/``."""
    meta = metadata(
        setup=f"bf16, B={B}, H={H}, L={L}, D={D}, forward+backward, do_bench median, n=1"
    )
    lines = [
        f"flex_attention_n, {environment_line(meta)} ({meta['setup']})",
        "",
        *table_header(
            "mask (density)",
            "path",
            "ms",
            "x reference",
            "peak MiB",
            "flex vs reference rel. err.",
        ),
    ]
    is_reference = lambda r: r["variant"].startswith("reference")
    ratios = ratios_to_baseline(rows, key="ms", is_baseline=is_reference, match=("mask",))
    for r, ratio in zip(rows, ratios):
        if "ms" in r:
            ratio_text = "-" if ratio is None else f"{ratio:.3f}"
            timing = f"{r['ms']:.3f} | {ratio_text} | {r['peak_mib']:.0f}"
        else:
            timing = "error | - | -"
        lines.append(
            f"| {r['mask']} ({r['mask_density']:.3f}) | {r['variant']} | {timing} | "
            f"{r['flex_vs_reference_rel_err']:.1e} |"
        )
    table = "\n".join(lines)
    print(table)
    errors = [f"{r['mask']} / {r['variant']}: {r['error']}" for r in rows if "error" in r]
    if errors:
        print("\n".join(errors), file=sys.stderr)
    write_results("flex", {"meta": meta, "rows": rows}, table, script_file=__file__)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=256, help="sliding-window width (keys)")
    parser.add_argument("--docs", type=int, default=8, help="documents per packed sequence")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not require_cuda(__file__):
        return 2
    from softmax_n import (
        flash_attention_n,
        flash_attention_n_triton,
        flex_attention_n,
        slow_attention_n,
    )
    from softmax_n.flex import causal_block_mask
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # FlexAttention compiles once per (mask, grad mode, lse or not): more variants than
    # torch.compile's default recompile limit (8), past which it would fall back to eager
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
    generator = torch.Generator().manual_seed(args.seed)
    docs = document_ids(args.docs, generator).cuda()
    window = args.window

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    def documents(b, h, q_idx, kv_idx):
        return (docs[b, q_idx] == docs[b, kv_idx]) & (q_idx >= kv_idx)

    pos = torch.arange(L, device="cuda")
    q_idx, kv_idx = pos[:, None], pos[None, :]
    masks = {  # name: (BlockMask, the same mask as a dense bool [B or 1, 1, L, L])
        "causal": (causal_block_mask(L, L, "cuda"), (q_idx >= kv_idx)[None, None]),
        f"sliding window {window}": (
            create_block_mask(sliding, None, None, L, L, device="cuda"),
            sliding(None, None, q_idx, kv_idx)[None, None],
        ),
        f"{args.docs} packed documents": (
            create_block_mask(documents, B, None, L, L, device="cuda"),
            ((docs[:, :, None] == docs[:, None, :]) & (q_idx >= kv_idx))[:, None],
        ),
    }
    torch.manual_seed(args.seed)
    q, k, v = (
        torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    compiled_flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for name, (block_mask, dense) in masks.items():
        density = dense.float().mean().item()

        def flex_n(q, k, v):
            return flex_attention_n(q, k, v, 1.0, block_mask=block_mask)

        def reference(q, k, v):
            return slow_attention_n(q, k, v, attn_mask=dense, softmax_n_param=1.0)

        def flex_plain(q, k, v):
            return compiled_flex(q, k, v, block_mask=block_mask)

        with torch.no_grad():  # the two paths agree (bf16)
            a, b = flex_n(q, k, v).float(), reference(q, k, v).float()
            rel = ((a - b).norm() / b.norm()).item()
        variants = {
            "flex_attention_n n=1": flex_n,
            "reference (slow_attention_n, dense mask) n=1": reference,
            "flex_attention softmax (no lse, no gate)": flex_plain,
        }
        if name == "causal":
            variants["flash_attention_n n=1 (cuDNN/FA + gate)"] = lambda q, k, v: flash_attention_n(
                q, k, v, 1.0, is_causal=True
            )
            variants["flash_attention_n_triton n=1"] = lambda q, k, v: flash_attention_n_triton(
                q, k, v, 1.0, is_causal=True
            )
        for variant, fn in variants.items():
            try:
                ms, mib = measure(fn, q, k, v)
                row = {"mask": name, "variant": variant, "ms": ms, "peak_mib": mib}
            except Exception as exc:  # report, do not hide, what a path cannot run
                row = {"mask": name, "variant": variant, "error": repr(exc)[:300]}
                torch.cuda.empty_cache()
            row["mask_density"], row["flex_vs_reference_rel_err"] = density, rel
            rows.append(row)
    report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
