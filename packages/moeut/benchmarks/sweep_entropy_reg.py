r"""Launch settings of the entropy regulariser's kernels (``moeut.entropy_triton.LAUNCH``).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/moeut/benchmarks/sweep_entropy_reg.py

For MoEUT-244M's two logits shapes (``ab_entropy_reg.SHAPES``), forward + backward GPU time of
``entropy_reg`` (replayed from a CUDA graph, median) for each combination of elements per tile
step, rows per program and warps, in one process. Writes ``sweep_entropy_reg.json`` and ``.md``
to ``$OUT`` if set, else to ``benchmarks/results/``.
"""

from __future__ import annotations

import itertools
import sys

from ab_entropy_reg import SHAPES, _step
from bench_harness import environment_line, median_ms, metadata, require_cuda, write_results
from moeut import entropy_triton

BLOCK_ELEMENTS = (4096, 8192, 16384)
ROWS = (128, 256, 512, 1024)
WARPS = (4, 8)


def main() -> int:
    if not require_cuda(__file__):
        return 2
    shipped = dict(entropy_triton.LAUNCH)
    rows = []
    try:
        for elements, n_rows, warps in itertools.product(BLOCK_ELEMENTS, ROWS, WARPS):
            entropy_triton.LAUNCH.update(block_elements=elements, rows=n_rows, warps=warps)
            row = {"block_elements": elements, "rows": n_rows, "warps": warps}
            for name, (shape, dim) in SHAPES.items():
                row[name] = median_ms(_step(shape, dim), warmup=10, rep=50, cuda_graph=True) * 1e3
            rows.append(row)
    finally:
        entropy_triton.LAUNCH.update(shipped)
    rows.sort(key=lambda r: r["feedforward"] + 2 * r["attention"])  # a step's mix: 1 to 2
    meta = metadata(setup="entropy_reg forward + backward, float32 logits, from a CUDA graph")
    lines = [
        f"entropy_reg launch settings, {environment_line(meta)} ({meta['setup']}); shipped "
        f"{shipped}; sorted by feedforward + 2 x attention us",
        "",
        "| elements per step | rows per program | warps | feedforward us | attention us |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['block_elements']} | {r['rows']} | {r['warps']} | {r['feedforward']:.1f} | "
        f"{r['attention']:.1f} |"
        for r in rows
    ]
    table = "\n".join(lines)
    print(table)
    write_results("sweep_entropy_reg", {"meta": meta, "rows": rows}, table, script_file=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
