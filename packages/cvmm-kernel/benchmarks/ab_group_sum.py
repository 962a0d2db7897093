r"""Launch settings of the sums over a group's consecutive rows (``moe_triton.gated_group_sum``:
``moe_mlp``'s k-sums, ``moe_linear``'s sums over heads) in whole steps.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':'):packages/cvmm-kernel/benchmarks \
        python3 packages/cvmm-kernel/benchmarks/ab_group_sum.py

Forward + backward (``bench_cvmm``'s fused ops, CUDA-graph replays, medians, two passes
alternating, one process) at MoEUT-244M's feedforward (k=16), SwitchHead V and O at 4 x 8 (sums
over 4 heads) and 64 x 4096 (k=2), for each setting of ``GROUP_SUM_BLOCKS`` (the shipped one
first and again last; the others from the kernel-alone timings of ``ab_ksum.md``), with the
results' largest difference from the shipped setting's (the sums' order does not change: 0).
Writes ``ab_group_sum.{json,md}`` to ``$OUT`` (else ``benchmarks/results``).
"""

from __future__ import annotations

import sys

import torch
from bench_cvmm import SHAPES, make_inputs, ours_fused, time_fwd_bwd, trained_tensors
from bench_harness import environment_line, metadata, require_cuda, write_results
from cvmm_kernel import moe_triton

SHIPPED = dict(moe_triton.GROUP_SUM_BLOCKS)
VARIANTS = [
    ("shipped", SHIPPED),
    ("wide rows", {0: SHIPPED[0], 16: (8, 1024, 8), 4: (4, 1024, 4), 2: (8, 1024, 8)}),
    ("16-group blocks", {0: SHIPPED[0], 16: (16, 512, 8), 4: (16, 128, 4), 2: (16, 512, 8)}),
    ("shipped again", SHIPPED),
]
NAMES = ("moeut-244m-ffn", "switchhead-v-4x8", "switchhead-o-4x8", "large-64x4096-k2")


def step_rows(names, variants: list, apply) -> list[dict]:
    """Forward + backward of ``bench_cvmm``'s fused op (CUDA-graph replays, medians, two passes
    alternating, one process) at the ``SHAPES`` named in ``names``, for each ``(label,
    setting)`` of ``variants``, put in force by ``apply(setting)``: rows of shape, variant, both
    passes' ms, the faster, and the output's largest difference from the first variant's. The
    first variant's setting is in force afterwards."""
    rows = []
    for s in [s for s in SHAPES if s.name in names]:
        t = make_inputs(s, "cuda")
        params = trained_tensors(t)
        times: dict[str, list[float]] = {label: [] for label, _ in variants}
        outs = {}
        try:
            for _ in range(2):
                for label, setting in variants:
                    apply(setting)
                    with torch.no_grad():
                        outs.setdefault(label, ours_fused(s, t, True).float())
                    times[label].append(
                        time_fwd_bwd(lambda s=s, t=t: ours_fused(s, t, True), params)[0]
                    )
        finally:
            apply(variants[0][1])
        for label, _ in variants:
            diff = float((outs[label] - outs[variants[0][0]]).abs().max())
            rows.append(dict(shape=s.name, variant=label, ms_passes=times[label],
                             ms=min(times[label]), max_abs_diff=diff))  # fmt: skip
            print(f"{s.name:20s} {label:22s} {min(times[label]):.4f} ms diff {diff:.1e}")
        torch.cuda.empty_cache()
    return rows


def ratio_table(rows: list[dict], baseline: str) -> list[str]:
    """``step_rows``' rows as markdown table lines, each variant's time against ``baseline``'s
    at the same shape."""
    base = {r["shape"]: r["ms"] for r in rows if r["variant"] == baseline}
    return [
        f"| shape | variant | ms (two passes) | vs {baseline} | max abs diff |",
        "|---|---|---|---|---|",
        *[
            f"| {r['shape']} | {r['variant']} | " + ", ".join(f"{m:.4f}" for m in r["ms_passes"])
            + f" | {r['ms'] / base[r['shape']]:.3f} | {r['max_abs_diff']:.1e} |"
            for r in rows
        ],
    ]  # fmt: skip


def _set_blocks(blocks: dict) -> None:
    moe_triton.GROUP_SUM_BLOCKS.clear()
    moe_triton.GROUP_SUM_BLOCKS.update(blocks)


def main() -> int:
    if not require_cuda(__file__):
        return 2
    rows = step_rows(NAMES, VARIANTS, _set_blocks)
    meta = metadata(dtype="bfloat16", settings={k: str(v) for k, v in VARIANTS})
    lines = [
        f"group sums' launch settings in whole steps, {environment_line(meta)}",
        "",
        "Made by `benchmarks/ab_group_sum.py`: forward + backward, CUDA-graph replays, the "
        "faster of two passes. Settings by k: (groups per block, columns per block, warps).",
        "",
        *ratio_table(rows, "shipped"),
    ]
    write_results("ab_group_sum", {"meta": meta, "rows": rows}, "\n".join(lines) + "\n",
                  script_file=__file__)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
