r"""A/B of the router top-k: one max-reduction of packed keys per round against two reductions.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/cvmm-kernel/benchmarks/ab_topk_keys.py

``topk_indices`` and ``sigmoid_topk`` at the routers' shapes, bf16 and fp32 scores, with
``topk_triton.PACKED_KEYS`` on (each score and its column in one int32/int64 key, one
max-reduction per round) and off (the largest score, then the lowest column holding it: two
reductions per round). Both must give the same indices and gates (``same``). Then the packed
kernel's rows per program and warps at MoEUT-244M's shape. CUDA-graph replays, medians, two
passes in one process (the second reported). Writes ``ab_topk_keys.json`` and ``.md`` to
``$OUT`` (else ``benchmarks/results``).
"""

from __future__ import annotations

import sys

import torch
from bench_harness import environment_line, median_ms, metadata, require_cuda, write_results
from cvmm_kernel import sigmoid_topk, topk_indices
from cvmm_kernel import topk_triton as kt
from cvmm_kernel.host_math import cdiv

# (name, rows, experts, k, groups): groups > 1 is SwitchHead's per-head choice (global index)
CASES = [
    ("moeut-244m-ffn", 8192, 387, 16, 1),
    ("ffn-128x128-k4", 8192, 128, 4, 1),
    ("switchhead-4x10", 8192, 10, 2, 4),
    ("switchhead-4x4", 8192, 4, 2, 4),
]
SWEEP = [(4, 4), (8, 4), (16, 4), (2, 2), (4, 2), (8, 2), (1, 1), (2, 1), (4, 1), (16, 8), (32, 8)]


def _ops(scores: torch.Tensor, k: int, groups: int):
    if groups == 1:
        return [("topk_indices", lambda: topk_indices(scores, k)),
                ("sigmoid_topk", lambda: sigmoid_topk(scores, k))]  # fmt: skip
    view = scores.view(-1, groups, scores.shape[-1])
    return [("topk_indices", lambda: topk_indices(view, k)),
            ("sigmoid_topk", lambda: sigmoid_topk(view, k, global_index=True))]  # fmt: skip


def _time(fn) -> float:
    return median_ms(fn, warmup=20, rep=200, cuda_graph=True) * 1e3


def _sweep(scores: torch.Tensor, k: int) -> list[dict]:
    """The packed kernel launched directly with other (rows per program, warps)."""
    n_rows, width = scores.shape
    out = torch.empty(n_rows, k, dtype=torch.int64, device=scores.device)
    want = topk_indices(scores, k)
    rows = []
    for block_r, warps in SWEEP:

        def run(block_r=block_r, warps=warps):
            grid = (cdiv(n_rows, block_r),)
            kt._topk_indices_kernel[grid](
                scores, out, n_rows, width, scores.stride(0), K=k,
                KEY_BITS=kt.key_bits(scores.dtype, width), BLOCK_R=block_r,
                BLOCK_E=kt.row_blocks(width)[1], num_warps=warps,
            )  # fmt: skip

        run()
        same = torch.equal(out, want)
        rows.append({"rows_per_program": block_r, "warps": warps, "us": _time(run),
                     "same": same})  # fmt: skip
        print(f"sweep {scores.dtype!s:15s} rows {block_r:3d} warps {warps} "
              f"{rows[-1]['us']:7.1f} us same={same}")  # fmt: skip
    return rows


def main() -> int:
    if not require_cuda(__file__):
        return 2
    g = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for _pass in range(2):
        results = []
        for name, n, e, k, groups in CASES:
            for dtype in (torch.bfloat16, torch.float32):
                scores = torch.randn(n * groups, e, device="cuda", generator=g).to(dtype)
                for op, fn in _ops(scores, k, groups):
                    row = {"case": name, "dtype": str(dtype).removeprefix("torch."), "op": op}
                    outs = {}
                    for packed in (False, True):
                        kt.PACKED_KEYS[0] = packed
                        outs[packed] = fn()
                        row["packed_us" if packed else "rounds_us"] = _time(fn)
                    kt.PACKED_KEYS[0] = True
                    a, b = outs[False], outs[True]
                    same = all(torch.equal(x, y) for x, y in zip(a, b)) if isinstance(a, tuple) \
                        else torch.equal(a, b)  # fmt: skip
                    row["same"] = same
                    row["packed_over_rounds"] = row["packed_us"] / row["rounds_us"]
                    results.append(row)
                    print(f"{name:16s} {row['dtype']:9s} {op:13s} rounds {row['rounds_us']:6.1f}"
                          f" packed {row['packed_us']:6.1f} us  x{row['packed_over_rounds']:.2f}"
                          f" same={same}")  # fmt: skip
    sweeps = {}
    for dtype in (torch.bfloat16, torch.float32):
        scores = torch.randn(8192, 387, device="cuda", generator=g).to(dtype)
        sweeps[str(dtype).removeprefix("torch.")] = _sweep(scores, 16)
    meta = metadata()
    lines = [
        "Router top-k: packed keys (one max-reduction per round) against two reductions per "
        f"round, {environment_line(meta)}",
        "",
        "`topk_triton.PACKED_KEYS` on and off in one process; CUDA-graph replays, medians, the "
        "second of two passes. `same`: equal indices (and gates).",
        "",
        "| case | dtype | op | two reductions us | packed keys us | packed / two | same |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cells = (r["case"], r["dtype"], r["op"], f"{r['rounds_us']:.1f}", f"{r['packed_us']:.1f}",
                 f"{r['packed_over_rounds']:.2f}", str(r["same"]))  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Packed kernel at 8192 x 387, k=16, launched directly:", "",
              "| dtype | rows per program | warps | us | same |",
              "|---|---|---|---|---|"]  # fmt: skip
    for dtype, rows in sweeps.items():
        for r in rows:
            cells = (dtype, r["rows_per_program"], r["warps"], f"{r['us']:.1f}", r["same"])
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    write_results("ab_topk_keys", {"meta": meta, "results": results, "sweep": sweeps},
                  "\n".join(lines), script_file=__file__)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
