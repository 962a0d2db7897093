r"""A/B: the loads of the sums over a group's rows (``moe_triton.gated_group_sum``) marked
evict-first or not (forward + backward, bf16, CUDA-graph replays, medians, two passes
alternating, one process).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':'):packages/cvmm-kernel/benchmarks \
        python3 packages/cvmm-kernel/benchmarks/ab_l2_order.py [--stores]

SwitchHead's O (forward) and V (input gradient) at 4 heads x 8 and x 10 experts sum 4 product
rows per token (67 MB of bf16 at 8192 tokens, more than the H100's 50 MB L2) right after the
row-tile kernel writes them, with the gate's gradient; then MoEUT-244M's feedforward and
64 x 4096 (k-sums of the GEMM's products, the gate frozen). Each row is read once: marked
``evict_first`` (``moe_triton.GROUP_SUM_EVICT``, shipped) it leaves L2 to what is read again.
This script's first version (commit 1464a8a, with its results) also timed the row-tile kernel's
programs numbered column block by column block and the sum reading the last written column
block first: no faster with evict-first loads, and not kept. Writes ``ab_l2_order.{json,md}``,
``profile_l2_order.txt`` and ``ab_l2_order_ffn.{json,md}`` to ``$OUT`` (else
``benchmarks/results``).

``--stores``: the row-tile kernels' stores of per-slot products (``moe_gemm_rows``,
``moe_mlp_rows``, ``pair_rows``; a sum reads each once) with Triton's default eviction
(shipped), ``evict_first`` or ``evict_last`` (``moe_triton.PRODUCT_STORE_EVICT``), in the steps
of ``bench_cvmm``'s feedforward and 4 x 8 V/O shapes (the gate frozen), two passes alternating;
writes ``ab_product_stores.{json,md}``.
"""

from __future__ import annotations

import sys

import torch
from ab_pair_slots import _switch, run_pair_ab
from bench_cvmm import SHAPES, Shape, make_inputs, ours_fused, time_fwd_bwd, trained_tensors
from bench_harness import environment_line, metadata, require_cuda, write_results

VARIANTS = [  # (label, switches)
    ("evict_first (shipped)", {}),
    ("default eviction", {"GROUP_SUM_EVICT": ""}),
    ("shipped again", {}),
]
FFN_NAMES = ("moeut-244m-ffn", "large-64x4096-k2")
STORE_VARIANTS = ["", "evict_first", "evict_last", ""]
STORE_NAMES = ("moeut-244m-ffn", "ffn-128x128-k4", "switchhead-v-4x8", "switchhead-o-4x8",
               "large-64x4096-k2")  # fmt: skip


def product_store_rows() -> int:
    """``--stores``: the steps with each eviction policy of the product stores."""
    from cvmm_kernel import moe_triton

    shipped = moe_triton.PRODUCT_STORE_EVICT[0]
    labels = [f"{p or 'default'}{' again' if i == len(STORE_VARIANTS) - 1 else ''}"
              for i, p in enumerate(STORE_VARIANTS)]  # fmt: skip
    rows = []
    for s in [s for s in SHAPES if s.name in STORE_NAMES]:
        t = make_inputs(s, "cuda")
        params = trained_tensors(t)
        times: dict[str, list[float]] = {label: [] for label in labels}
        outs = {}
        try:
            for _ in range(2):
                for label, policy in zip(labels, STORE_VARIANTS):
                    moe_triton.PRODUCT_STORE_EVICT[0] = policy
                    with torch.no_grad():
                        outs.setdefault(label, ours_fused(s, t, True).float())
                    times[label].append(
                        time_fwd_bwd(lambda s=s, t=t: ours_fused(s, t, True), params)[0]
                    )
        finally:
            moe_triton.PRODUCT_STORE_EVICT[0] = shipped
        for label in labels:
            diff = float((outs[label] - outs[labels[0]]).abs().max())
            rows.append(dict(shape=s.name, variant=label, ms_passes=times[label],
                             ms=min(times[label]), max_abs_diff=diff))  # fmt: skip
            print(f"{s.name:20s} {label:18s} {min(times[label]):.4f} ms diff {diff:.1e}")
        torch.cuda.empty_cache()
    meta = metadata(dtype="bfloat16", timing="do_bench median of CUDA-graph replays, best of 2")
    base = {r["shape"]: r["ms"] for r in rows if r["variant"] == "default"}
    lines = [
        f"product stores' eviction policy, {environment_line(meta)}",
        "",
        "| shape | variant | ms (two passes) | vs default | max abs diff |",
        "|---|---|---|---|---|",
        *[
            f"| {r['shape']} | {r['variant']} | " + ", ".join(f"{m:.4f}" for m in r["ms_passes"])
            + f" | {r['ms'] / base[r['shape']]:.3f} | {r['max_abs_diff']:.1e} |"
            for r in rows
        ],
    ]  # fmt: skip
    write_results("ab_product_stores", {"meta": meta, "rows": rows}, "\n".join(lines) + "\n",
                  script_file=__file__)  # fmt: skip
    return 0


def ffn_rows() -> list[dict]:
    """The feedforward shapes' steps with the sum's loads marked evict-first or not."""
    rows = []
    for s in [s for s in SHAPES if s.name in FFN_NAMES]:
        t = make_inputs(s, "cuda")
        params = trained_tensors(t)
        times: dict[str, list[float]] = {label: [] for label, _ in VARIANTS}
        for _ in range(2):
            for label, on in VARIANTS:
                _switch(on)
                times[label].append(
                    time_fwd_bwd(lambda s=s, t=t: ours_fused(s, t, True), params)[0]
                )
        _switch({})
        for label, _ in VARIANTS:
            rows.append(dict(shape=s.name, variant=label, ms_passes=times[label],
                             ms=min(times[label])))  # fmt: skip
            print(f"{s.name:20s} {label:22s} {min(times[label]):.4f} ms")
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    if not require_cuda(__file__):
        return 2
    if "--stores" in sys.argv[1:]:
        return product_store_rows()
    variants = [(label, on, {}, str(on)) for label, on in VARIANTS]
    shapes = [Shape(f"switchhead-{kind}-4x{e}", 8192, 1024, e, 128, 2, kind, heads=4)
              for e in (8, 10) for kind in ("o", "v")]  # fmt: skip
    run_pair_ab(variants, "switches", "moe_linear: the group sums' loads evict-first or not",
                "l2_order", __file__, shapes)  # fmt: skip
    rows = ffn_rows()
    meta = metadata(dtype="bfloat16", timing="do_bench median of CUDA-graph replays, best of 2")
    base = {r["shape"]: r["ms"] for r in rows if r["variant"] == VARIANTS[0][0]}
    lines = [
        f"k-sums with evict-first loads, {environment_line(meta)}",
        "",
        f"| shape | variant | ms (two passes) | vs {VARIANTS[0][0]} |",
        "|---|---|---|---|",
        *[
            f"| {r['shape']} | {r['variant']} | " + ", ".join(f"{m:.4f}" for m in r["ms_passes"])
            + f" | {r['ms'] / base[r['shape']]:.3f} |"
            for r in rows
        ],
    ]  # fmt: skip
    write_results("ab_l2_order_ffn", {"meta": meta, "rows": rows}, "\n".join(lines) + "\n",
                  script_file=__file__)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
