r"""A/B of ``moe_linear`` calls by pairs of experts (``cvmm_kernel.pair_slots``: one routing of
the items by pair and the slots by expert, every sum by pairs) against per-slot products, at
SwitchHead's V and O shapes with 8 experts per head (bf16, forward + backward, CUDA-graph
replays, medians), with launch settings of the pairs' GEMM (``linear_pair_gemm``: ``BLOCK_N``,
``BLOCK_K``, warps, stages) and tile heights (``block_m``), all passed explicitly.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':'):packages/cvmm-kernel/benchmarks \
        python3 packages/cvmm-kernel/benchmarks/ab_pair_routing.py

Two passes alternating in one process, against dense matmuls of equal FLOPs (the gate's
gradient computed too, as in the layer); the outputs and gradients of each compared with the
per-slot path's. Then the kernel times of one step per path (torch profiler). Writes
``ab_pair_routing.{json,md}`` and ``profile_pair_routing.txt`` to ``$OUT`` (else
``benchmarks/results``).
"""

from __future__ import annotations

import sys

from ab_pair_slots import run_pair_ab
from bench_harness import require_cuda

# (block_m, the pairs' GEMM's launch setting (BLOCK_N, BLOCK_K, warps, stages)) tried; the
# first is the shipped one
SETTINGS = [
    (128, (128, 64, 8, 3)), (128, (128, 32, 8, 4)), (128, (128, 64, 8, 4)), (128, (64, 64, 8, 3)),
    (128, (64, 64, 4, 3)), (128, (128, 64, 4, 3)), (64, (128, 64, 4, 3)), (64, (64, 64, 4, 3)),
    (64, (128, 32, 8, 4)), (64, (128, 32, 4, 4)), (32, (64, 64, 4, 3)),
]  # fmt: skip
# (label, pairs on, launch keywords of moe_linear)
VARIANTS = [
    ("slots", False, {}),
    *[(f"pairs block_m {bm}, gemm {c}", True,
       {"block_m": bm, "gemm_configs": {"linear_pair_gemm": c}}) for bm, c in SETTINGS],
]  # fmt: skip


def main() -> int:
    if not require_cuda(__file__):
        return 2
    variants = [(label, on, launch, repr(launch)) for label, on, launch in VARIANTS]
    return run_pair_ab(variants, "launch", "moe_linear calls by pairs of experts A/B",
                       "pair_routing", __file__)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
