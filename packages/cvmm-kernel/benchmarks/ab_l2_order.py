r"""A/B: the order in which the products of ``moe_linear``'s row-tile kernel are written and
summed over heads, so that the sum finds them in L2 (forward + backward, bf16, CUDA-graph
replays, medians, two passes alternating, one process).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':'):packages/cvmm-kernel/benchmarks \
        python3 packages/cvmm-kernel/benchmarks/ab_l2_order.py

SwitchHead's O (forward) and V (input gradient) at 4 heads x 8 and x 10 experts sum 4 product
rows per token (67 MB of bf16 at 8192 tokens, more than the H100's 50 MB L2) right after the
row-tile kernel writes them. Variants: ``pair_slots.COLUMNS_OUTER`` (the kernel's programs
numbered column block by column block, so the products are written from the first column block
to the last, and the sum reads them last block first: the most recently written, still in L2,
first) and ``moe_triton.GROUP_SUM_EVICT`` (the sum's loads marked ``evict_first``, so that its
own misses and stores evict rows it has read rather than rows it has yet to read). Then
MoEUT-244M's feedforward and 64 x 4096 (k-sums over products from the GEMM, not reordered)
with and without the eviction hint. Writes ``ab_l2_order.{json,md}``, ``profile_l2_order.txt``
and ``ab_l2_order_ffn.{json,md}`` to ``$OUT`` (else ``benchmarks/results``).
"""

from __future__ import annotations

import sys

import torch
from ab_pair_slots import _switch, run_pair_ab
from bench_cvmm import SHAPES, Shape, make_inputs, ours_fused, time_fwd_bwd, trained_tensors
from bench_harness import environment_line, metadata, require_cuda, write_results

VARIANTS = [  # (label, switches)
    ("shipped", {}),
    ("columns outer", {"COLUMNS_OUTER": True, "GROUP_SUM_EVICT": ""}),
    ("columns outer + evict_first", {"COLUMNS_OUTER": True, "GROUP_SUM_EVICT": "evict_first"}),
    ("evict_first", {"COLUMNS_OUTER": False, "GROUP_SUM_EVICT": "evict_first"}),
    ("shipped again", {}),
]
FFN_NAMES = ("moeut-244m-ffn", "large-64x4096-k2")


def ffn_rows() -> list[dict]:
    """The feedforward shapes' steps with the sum's loads marked evict-first or not."""
    rows = []
    for s in [s for s in SHAPES if s.name in FFN_NAMES]:
        t = make_inputs(s, "cuda")
        params = trained_tensors(t)
        labels = ("default", "evict_first", "default again")
        times: dict[str, list[float]] = {label: [] for label in labels}
        for _ in range(2):
            for label in labels:
                _switch({"GROUP_SUM_EVICT": "evict_first" if label == "evict_first" else ""})
                times[label].append(
                    time_fwd_bwd(lambda s=s, t=t: ours_fused(s, t, True), params)[0]
                )
        _switch({})
        for label in labels:
            rows.append(dict(shape=s.name, variant=label, ms_passes=times[label],
                             ms=min(times[label])))  # fmt: skip
            print(f"{s.name:20s} {label:14s} {min(times[label]):.4f} ms")
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    if not require_cuda(__file__):
        return 2
    variants = [(label, on, {}, str(on)) for label, on in VARIANTS]
    shapes = [Shape(f"switchhead-{kind}-4x{e}", 8192, 1024, e, 128, 2, kind, heads=4)
              for e in (8, 10) for kind in ("o", "v")]  # fmt: skip
    run_pair_ab(variants, "switches", "moe_linear: the products' order and the sum's eviction",
                "l2_order", __file__, shapes)  # fmt: skip
    rows = ffn_rows()
    meta = metadata(dtype="bfloat16", timing="do_bench median of CUDA-graph replays, best of 2")
    base = {r["shape"]: r["ms"] for r in rows if r["variant"] == "default"}
    lines = [
        f"k-sums with evict-first loads, {environment_line(meta)}",
        "",
        "| shape | variant | ms (two passes) | vs default |",
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
