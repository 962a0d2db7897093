r"""A/B of the expert matrices loaded by TMA (tensor descriptors) against pointer loads.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':')packages/cvmm-kernel/benchmarks \
        python3 packages/cvmm-kernel/benchmarks/ab_tensor_descriptors.py

Every shape of ``bench_cvmm.py``: its fused op (``moe_mlp`` / ``moe_linear``, deterministic,
bf16, forward + backward, CUDA-graph replays, medians) with ``TENSOR_DESCRIPTORS`` on and off,
timed interleaved twice each in one process beside the dense matmuls of equal FLOPs, and how far
the two modes' outputs and gradients differ. Then the 244M shape's kernel times per step under
both. Writes ``ab_tensor_descriptors.json`` and ``.md`` to ``$OUT`` (else
``benchmarks/results``).
"""

from __future__ import annotations

import sys

import torch
from bench_harness import (
    environment_line,
    metadata,
    profile_steps,
    require_cuda,
    write_results,
    write_text,
)


def run_both(B, kt, s, t, params):
    """Outputs and gradients of the fused op with descriptors on and off."""
    results = []
    for mode in (True, False):
        kt.TENSOR_DESCRIPTORS[0] = mode
        for p in params:
            p.grad = None
        out = B.ours_fused(s, t, True)
        out.backward(torch.ones_like(out))
        results.append([v.detach().float().clone() for v in (out, *(p.grad for p in params))])
    kt.TENSOR_DESCRIPTORS[0] = True
    return results


def compare(B, kt, s) -> dict:
    t = B.make_inputs(s, "cuda")
    params = B.trained_tensors(t)
    on, off = run_both(B, kt, s, t, params)
    diff = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(on, off))
    fused = lambda: B.ours_fused(s, t, True)
    dense_fn, dense_params = B.dense_equal_flops(s, "cuda")
    times: dict[str, list[float]] = {"dense": [], "tma": [], "pointer": []}
    for name in ("dense", "tma", "pointer", "tma", "pointer", "dense"):
        kt.TENSOR_DESCRIPTORS[0] = name != "pointer"
        fn, ps = (dense_fn, dense_params) if name == "dense" else (fused, params)
        times[name].append(B.time_fwd_bwd(fn, ps)[0])
    kt.TENSOR_DESCRIPTORS[0] = True
    best = {name: min(v) for name, v in times.items()}
    row = dict(
        shape=s.name,
        max_rel_diff=diff,
        **{f"{name}_ms": v for name, v in best.items()},
        tma_pct=best["dense"] / best["tma"],
        pointer_pct=best["dense"] / best["pointer"],
        tma_vs_pointer=best["tma"] / best["pointer"],
    )
    print(
        f"{s.name:18s} dense {best['dense']:.3f} pointer {best['pointer']:.3f} "
        f"({row['pointer_pct']:.1%}) tma {best['tma']:.3f} ({row['tma_pct']:.1%}) "
        f"x{row['tma_vs_pointer']:.3f} diff {diff:.1e}"
    )
    return row


def kernel_table(B, kt, s) -> str:
    t = B.make_inputs(s, "cuda")
    params = B.trained_tensors(t)
    step = B.fwd_bwd_step(lambda: B.ours_fused(s, t, True), params)
    lines = []
    for mode in (False, True):
        kt.TENSOR_DESCRIPTORS[0] = mode
        _, kernel_ms, events = profile_steps(step)
        lines.append(f"== {s.name}, descriptors {'on' if mode else 'off'}: {kernel_ms:.3f} ms")
        for e in sorted(events, key=lambda e: -e.self_device_time_total):
            if e.device_type.name == "CUDA" and e.self_device_time_total > 0:
                lines.append(f"  {e.key[:60]:60s} {e.self_device_time_total:9.1f} us x{e.count}")
    kt.TENSOR_DESCRIPTORS[0] = True
    return "\n".join(lines)


def main() -> int:
    if not require_cuda(__file__):
        return 2
    import bench_cvmm as B
    from cvmm_kernel import moe_triton as kt

    meta = metadata()
    rows = []
    for s in B.SHAPES:
        rows.append(compare(B, kt, s))
        torch.cuda.empty_cache()
    profile = kernel_table(B, kt, B.SHAPES[0])
    print(profile)
    write_results("ab_tensor_descriptors", {"meta": meta, "rows": rows, "profile": profile},
                  script_file=__file__, indent=1)  # fmt: skip
    lines = [
        f"Expert matrices by TMA vs pointer loads, fused ops, forward + backward, bf16, "
        f"{environment_line(meta)}",
        "",
        "| shape | dense ms | pointer ms (% of dense) | TMA ms (% of dense) | TMA / pointer | "
        "max rel. diff |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['dense_ms']:.3f} | {r['pointer_ms']:.3f} "
            f"({r['pointer_pct']:.0%}) | {r['tma_ms']:.3f} ({r['tma_pct']:.0%}) | "
            f"{r['tma_vs_pointer']:.3f} | {r['max_rel_diff']:.1e} |"
        )
    lines += ["", "```", profile, "```", ""]
    write_text("ab_tensor_descriptors.md", "\n".join(lines), script_file=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
