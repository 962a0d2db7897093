r"""A/B: the loads of the sums over a group's rows (``moe_triton.gated_group_sum``) marked
evict-first or not (forward + backward, bf16, CUDA-graph replays, medians, two passes
alternating, one process).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':'):packages/cvmm-kernel/benchmarks \
        python3 packages/cvmm-kernel/benchmarks/ab_l2_order.py

SwitchHead's O (forward) and V (input gradient) at 4 heads x 8 and x 10 experts sum 4 product
rows per token (67 MB of bf16 at 8192 tokens, more than the H100's 50 MB L2) right after the
row-tile kernel writes them, with the gate's gradient; then MoEUT-244M's feedforward and
64 x 4096 (k-sums of the GEMM's products, the gate frozen). Each row is read once: marked
``evict_first`` (``moe_triton.GROUP_SUM_EVICT``, shipped) it leaves L2 to what is read again.
This script's first version (commit 1464a8a, with its results) also timed the row-tile kernel's
programs numbered column block by column block and the sum reading the last written column
block first: no faster with evict-first loads, and not kept. At commit ee8b3ba its
``--stores`` mode timed the row-tile kernels' product stores under each eviction policy
(``ab_product_stores.md``: evict_first 0.4-1.8% slower, evict_last within noise; not kept).
Writes ``ab_l2_order.{json,md}``, ``profile_l2_order.txt`` and ``ab_l2_order_ffn.{json,md}``
to ``$OUT`` (else ``benchmarks/results``).
"""

from __future__ import annotations

import sys

from ab_group_sum import ratio_table, step_rows
from ab_pair_slots import _switch, run_pair_ab
from bench_cvmm import switchhead_shapes
from bench_harness import environment_line, metadata, require_cuda, write_results

VARIANTS = [  # (label, switches)
    ("evict_first (shipped)", {}),
    ("default eviction", {"GROUP_SUM_EVICT": ""}),
    ("shipped again", {}),
]
FFN_NAMES = ("moeut-244m-ffn", "large-64x4096-k2")


def main() -> int:
    if not require_cuda(__file__):
        return 2
    variants = [(label, on, {}, str(on)) for label, on in VARIANTS]
    run_pair_ab(variants, "switches", "moe_linear: the group sums' loads evict-first or not",
                "l2_order", __file__, switchhead_shapes((8, 10), ("o", "v")))  # fmt: skip
    rows = step_rows(FFN_NAMES, VARIANTS, _switch)
    meta = metadata(dtype="bfloat16", timing="do_bench median of CUDA-graph replays, best of 2")
    lines = [f"k-sums with evict-first loads, {environment_line(meta)}", "",
             *ratio_table(rows, VARIANTS[0][0])]  # fmt: skip
    write_results("ab_l2_order_ffn", {"meta": meta, "rows": rows}, "\n".join(lines) + "\n",
                  script_file=__file__)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
