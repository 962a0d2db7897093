r"""A/B of the SwitchHead layer's expert paths with cvmm-kernel's dense slot layouts on and off.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':'):packages/switchhead/benchmarks \
        python3 packages/switchhead/benchmarks/ab_dense_slots_layer.py

rope-4x4-d100 (B=8, d_model=1024, causal, bf16 autocast, forward + backward) with the
dense-gated experts (``expert_impl="dense"``, what ``"auto"`` takes at 4 x 4) and with
``moe_linear`` (``"cvmm"``) at ``cvmm_kernel.dense_slots.MAX_RATIO`` 0 (sparse kernels) and 2
(dense slot layouts at 4 x 4), against dense MHA run the same way; eager, compiled and replayed
from a CUDA graph; T = 1024 and 4096; one process. Writes ``ab_dense_slots_layer.{json,md}`` to
``$OUT`` (else ``benchmarks/results``).
"""

from __future__ import annotations

import sys

import torch
from bench_harness import environment_line, metadata, require_cuda, table_header, write_results
from bench_switchhead import DenseMHA, time_layer
from switchhead import SwitchHeadRope

MODES = ("eager", "compiled", "graph")


def main() -> int:
    if not require_cuda(__file__):
        return 2
    from cvmm_kernel import dense_slots

    variants = [
        ("dense-gated experts", "dense", 2.0),
        ("cvmm experts, sparse kernels", "cvmm", 0.0),
        ("cvmm experts, dense slot layouts", "cvmm", 2.0),
    ]
    rows = []
    for seq in (1024, 4096):
        for mode in MODES:
            torch._dynamo.reset()
            base = time_layer(DenseMHA, 8, seq, mode)["ms"]
            rows.append({"variant": "dense-mha-16x64", "T": seq, "mode": mode, "ms": base,
                         "ratio": 1.0})  # fmt: skip
            for label, impl, ratio in variants:
                dense_slots.MAX_RATIO[0] = ratio
                make = lambda impl=impl: SwitchHeadRope(1024, 4, 4, d_head=100, expert_impl=impl)
                result = time_layer(make, 8, seq, mode)
                rows.append({"variant": f"rope-4x4-d100, {label}", "T": seq, "mode": mode,
                             **result, "ratio": result["ms"] / base})  # fmt: skip
            dense_slots.MAX_RATIO[0] = 2.0
            torch.cuda.empty_cache()
    meta = metadata(setup="B=8, d_model=1024, causal, bf16 autocast, forward+backward")
    lines = [
        f"SwitchHead layer expert paths A/B, {environment_line(meta)} ({meta['setup']})",
        "",
        *table_header("T", "mode", "variant", "ms", "x dense MHA (same mode)", "peak MiB"),
    ]
    for r in rows:
        peak = f"{r['peak_mib']:.0f}" if "peak_mib" in r else ""
        lines.append(f"| {r['T']} | {r['mode']} | {r['variant']} | {r['ms']:.3f} | "
                     f"{r['ratio']:.2f} | {peak} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    write_results("ab_dense_slots_layer", {"meta": meta, "rows": rows}, table,
                  script_file=__file__)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
