r"""A/B of ``moe_linear``'s dense layouts (``cvmm_kernel.dense_slots``) at SwitchHead's V and O
shapes (bf16, forward + backward, CUDA-graph replays, medians).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':'):packages/cvmm-kernel/benchmarks \
        python3 packages/cvmm-kernel/benchmarks/ab_dense_slots.py [--host]

Each shape of ``bench_cvmm.py`` with ``dense_slots.MAX_RATIO`` at 0 (the sparse kernels only),
2 (the shipped bound: dense at 4 x 4) and 4 (dense at 4 x 8 too), two passes alternating, in one
process, against dense matmuls of equal FLOPs (the gate's gradient computed too, as in the
layer; ``bench_cvmm.py`` leaves the gate frozen); the outputs and gradients of each setting
compared with the sparse kernels'. Then the kernel times of one step per layout at 4 x 4 (torch
profiler). Writes ``ab_dense_slots.{json,md}`` and ``profile_dense_slots.txt`` to ``$OUT`` (else
``benchmarks/results``). ``--host`` instead times the host per eager forward + backward call at
64 tokens (the GPU idle), the settings alternating over three rounds
(``ab_dense_slots_host.{json,md}``).
"""

from __future__ import annotations

import argparse
import sys

import torch
from bench_cvmm import (
    SHAPES,
    dense_equal_flops,
    fwd_bwd_step,
    make_inputs,
    ours_fused,
    time_fwd_bwd,
)
from bench_harness import (
    environment_line,
    host_us,
    metadata,
    profile_steps,
    require_cuda,
    table_header,
    write_results,
    write_text,
)

# (label, MAX_RATIO)
VARIANTS = [("sparse", 0.0), ("dense <= 2", 2.0), ("dense <= 4", 4.0)]


def _step_results(s, t, params, **launch):
    out = ours_fused(s, t, True, **launch)
    gen = torch.Generator(out.device).manual_seed(1)
    out.backward(torch.randn(out.shape, device=out.device, generator=gen).to(out.dtype))
    grads = [p.grad.float() for p in params] + [t["gate"].grad.float()]
    for p in [*params, t["gate"]]:
        p.grad = None
    return [out.detach().float(), *grads]


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def host_times(dense_slots) -> int:
    """Host us per eager forward + backward at 64 tokens, sparse and dense alternating."""
    from dataclasses import replace

    rows = []
    for s in SHAPES:
        if s.kind == "ffn" or not s.name.endswith("4x4"):
            continue
        t = make_inputs(replace(s, tokens=64), "cuda")
        params = [t[k].requires_grad_() for k in ("w", "x")]

        def step():
            ours_fused(s, t, True).sum().backward()
            for p in params:
                p.grad = None

        for round_ in range(3):
            for label, ratio in VARIANTS[:2]:
                dense_slots.MAX_RATIO[0] = ratio
                rows.append({"shape": s.name, "variant": label, "round": round_,
                             "host_us": host_us(step)})  # fmt: skip
        dense_slots.MAX_RATIO[0] = 2.0
    meta = metadata(dtype="bfloat16", timing="host_us: median of 5 rounds of 50 calls")
    lines = [f"moe_linear host time per forward + backward, 64 tokens, {environment_line(meta)}",
             "", *table_header("shape", "variant", "host us (three rounds)")]  # fmt: skip
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for label, _ in VARIANTS[:2]:
            us = [r["host_us"] for r in rows if r["shape"] == shape and r["variant"] == label]
            lines.append(f"| {shape} | {label} | {', '.join(f'{v:.0f}' for v in us)} |")
    table = "\n".join(lines)
    print(table)
    write_results("ab_dense_slots_host", {"meta": meta, "rows": rows}, table, script_file=__file__)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", action="store_true", help="host time per call instead")
    args = parser.parse_args()
    if not require_cuda(__file__):
        return 2
    from cvmm_kernel import dense_slots

    if args.host:
        return host_times(dense_slots)

    rows = []
    profiles = []
    for s in SHAPES:
        if s.kind == "ffn":
            continue
        t, params, dense_ms = shape_setup(s)
        results = {}
        for label, ratio in VARIANTS:
            dense_slots.MAX_RATIO[0] = ratio
            results[label] = _step_results(s, t, params)
        times: dict[str, list[float]] = {v[0]: [] for v in VARIANTS}
        peaks: dict[str, float] = {}
        for _ in range(2):
            for label, ratio in VARIANTS:
                dense_slots.MAX_RATIO[0] = ratio
                # the gate's gradient too (as in the layer), cleared each step like the others
                ms, peaks[label] = time_fwd_bwd(lambda: ours_fused(s, t, True),
                                                [*params, t["gate"]])  # fmt: skip
                times[label].append(ms)
        for label, ratio in VARIANTS:
            ms = min(times[label])
            errors = [_rel(a, b) for a, b in zip(results[label], results["sparse"])]
            rows.append({
                "shape": s.name, "variant": label, "max_ratio": ratio, "ms_passes": times[label],
                "ms": ms, "dense_ms": dense_ms, "pct_of_dense": 100 * dense_ms / ms,
                "peak_mib": peaks[label],
                "rel_diff_vs_sparse": dict(zip(("out", "w", "x", "gate"), errors)),
            })  # fmt: skip
        if s.name.endswith("4x4"):
            for label, ratio in VARIANTS[:2]:
                dense_slots.MAX_RATIO[0] = ratio
                profiles.append(f"== {s.name}, {label}\n" + _profile(s, t, params))
        dense_slots.MAX_RATIO[0] = 2.0
        torch.cuda.empty_cache()
    write_ab("moe_linear dense layouts A/B", "dense_slots", rows, profiles, "sparse", __file__)
    return 0


def shape_setup(s):
    """``(inputs, the parameters with gradients, dense ms)`` of a V or O shape: the weight and
    the input take gradients, the gate too (as in the layer; ``bench_cvmm.py`` leaves it
    frozen); the dense matmuls of equal FLOPs timed."""
    t = make_inputs(s, "cuda")
    params = [t[k].requires_grad_() for k in ("w", "x")]
    t["gate"].requires_grad_()
    dense_fn, dense_params = dense_equal_flops(s, "cuda")
    return t, params, time_fwd_bwd(dense_fn, dense_params)[0]


def write_ab(title: str, name: str, rows: list, profiles: list, baseline: str,
             script_file: str) -> None:  # fmt: skip
    """Prints and writes an A/B's table (``ab_{name}.{json,md}``: each row's passes, share of the
    dense TFLOP/s, peak memory and largest difference from ``baseline``'s results, row key
    ``rel_diff_vs_{baseline}``) and its kernel profiles (``profile_{name}.txt``)."""
    meta = metadata(dtype="bfloat16", timing="do_bench median of CUDA-graph replays, best of 2")
    header = ("shape", "variant", "ms (two passes)", "% of dense TFLOP/s", "peak MiB",
              f"max rel. diff vs {baseline} (out, grads)")  # fmt: skip
    lines = [f"{title}, {environment_line(meta)}", "", *table_header(*header)]
    for r in rows:
        passes = ", ".join(f"{v:.3f}" for v in r["ms_passes"])
        diff = max(r[f"rel_diff_vs_{baseline}"].values())
        lines.append(f"| {r['shape']} | {r['variant']} | {passes} | {r['pct_of_dense']:.1f}% "
                     f"| {r['peak_mib']:.0f} | {diff:.1e} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    write_results(f"ab_{name}", {"meta": meta, "rows": rows}, table, script_file=script_file)
    text = f"moe_linear kernels per step, {environment_line(meta)}\n\n" + "\n".join(profiles)
    write_text(f"profile_{name}.txt", text, script_file=script_file)
    print("\n".join(profiles))


def _profile(s, t, params) -> str:
    """The kernel table of one profiled step (``bench_harness.profile_steps``)."""
    step = fwd_bwd_step(lambda: ours_fused(s, t, True), [*params, t["gate"]])
    events = profile_steps(step)[2]
    return events.table(sort_by="self_cuda_time_total", row_limit=14,
                        max_name_column_width=60)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
