r"""The entropy regulariser: Triton kernels against the plain expression, at MoEUT-244M's sizes.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':') \
        python3 packages/moeut/benchmarks/ab_entropy_reg.py

MoEUT-244M's training step takes ``entropy_reg`` six times: per layer of its group of two, of
the feedforward's selection logits ``[B, T * repeats, E] = [8, 9216, 387]`` averaged over the
tokens and repeats, and of each attention selection's ``[8, 9216, 4, 10]`` (float32). For each:
forward + backward GPU time (replayed from a CUDA graph; median) and host time per call (small
inputs: the launches and Python), the fused path (``moeut.entropy_triton``) and the plain
expression (the switch ``moeut.regularization._fused`` forced off), in one process. Writes
``ab_entropy_reg.json`` and ``.md`` to ``$OUT`` if set, else to ``benchmarks/results/``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from bench_harness import (
    environment_line,
    host_us,
    median_ms,
    metadata,
    require_cuda,
    table_header,
    write_results,
)
from moeut import entropy_reg, regularization

SHAPES = {"feedforward": ((8, 9216, 387), -2), "attention": ((8, 9216, 4, 10), -3)}
TINY = {"feedforward": ((1, 576, 387), -2), "attention": ((1, 576, 4, 10), -3)}


def _step(shape: tuple[int, ...], dim: int) -> Callable[[], None]:
    logits = torch.randn(*shape, device="cuda", requires_grad=True)

    def step() -> None:
        value = entropy_reg(logits, dim)
        value.backward()
        logits.grad = None

    return step


def main() -> int:
    if not require_cuda(__file__):
        return 2
    plain_switch = regularization._fused
    rows = []
    try:
        for name, (shape, dim) in SHAPES.items():
            for variant in ("fused", "plain"):
                regularization._fused = plain_switch if variant == "fused" else lambda _: False
                gpu = median_ms(_step(shape, dim), warmup=25, rep=200, cuda_graph=True) * 1e3
                tiny_shape, tiny_dim = TINY[name]
                host = host_us(_step(tiny_shape, tiny_dim))
                rows.append({"logits": name, "shape": list(shape), "variant": variant,
                             "gpu_us": gpu, "host_us": host})  # fmt: skip
    finally:
        regularization._fused = plain_switch
    meta = metadata(setup="entropy_reg forward + backward, float32 logits")
    lines = [
        f"entropy_reg, Triton kernels against the plain expression, {environment_line(meta)}",
        "",
        "GPU time at MoEUT-244M's sizes (from a CUDA graph, median); host time per call at "
        "tiny sizes (9 repeats of 64 tokens, B=1).",
        "",
        *table_header("logits", "shape", "variant", "GPU us", "x plain", "host us", "x plain"),
    ]
    plain = {r["logits"]: r for r in rows if r["variant"] == "plain"}
    for r in rows:
        base = plain[r["logits"]]
        lines.append(
            f"| {r['logits']} | {r['shape']} | {r['variant']} | {r['gpu_us']:.1f} | "
            f"{r['gpu_us'] / base['gpu_us']:.2f} | {r['host_us']:.0f} | "
            f"{r['host_us'] / base['host_us']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    write_results("ab_entropy_reg", {"meta": meta, "rows": rows}, table, script_file=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
