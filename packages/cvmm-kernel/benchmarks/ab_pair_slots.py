r"""A/B of ``moe_linear``'s slot sums by pairs of experts (``cvmm_kernel.pair_slots``) against
per-slot products, at SwitchHead's V and O shapes with 8 experts per head (bf16, forward +
backward, CUDA-graph replays, medians).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':'):packages/cvmm-kernel/benchmarks \
        python3 packages/cvmm-kernel/benchmarks/ab_pair_slots.py

For each 4 x 8 shape of ``bench_cvmm.py``: per-slot products (``pair_slots.ENABLED`` off), and
pairs with several launch settings of their kernel (``linear_pairs``: ``BLOCK_N``, ``BLOCK_M``,
warps, stages), two passes alternating, in one process,
against dense matmuls of equal FLOPs (the gate's gradient computed too, as in the layer); the
outputs and gradients of each compared with the per-slot path's. Then the kernel times of one
step per path (torch profiler). Writes ``ab_pair_slots.{json,md}`` and
``profile_pair_slots.txt`` to ``$OUT`` (else ``benchmarks/results``).
"""

from __future__ import annotations

import sys

import torch
from ab_dense_slots import _profile, _rel, _step_results, shape_setup, write_ab
from bench_cvmm import SHAPES, ours_fused, time_fwd_bwd
from bench_harness import require_cuda
from cvmm_kernel import moe_ops, moe_triton, pair_slots, pdl

# (label, pairs on, linear_pairs setting (BLOCK_N, BLOCK_M, warps, stages) or None: shipped)
VARIANTS = [
    ("slots", False, None),
    ("pairs", True, None),
    *[
        (f"pairs {cfg}", True, cfg)
        for cfg in [
            (128, 128, 8, 2),
            (128, 32, 4, 3),
            (64, 64, 4, 3),
            (64, 128, 4, 3),
            (256, 64, 8, 2),
            (128, 64, 8, 3),
            (128, 64, 4, 2),
            (64, 64, 4, 2),
            (64, 32, 4, 2),
            (128, 32, 4, 2),
            (128, 64, 2, 3),
            (64, 64, 2, 2),
            (128, 128, 4, 2),
        ]
    ],
]


# the shipped value of the one switch that is not plain on/off
_SHIPPED_EVICT = moe_triton.GROUP_SUM_EVICT[0]


def _switch(on) -> None:
    """Sets ``pair_slots``' switches: ``on`` whether calls run by pairs, or a dict of switch
    names and values; every switch not named is on (shipped). ``"linear_overlap"``: that key
    of ``moe_ops.BACKWARD_SCHEDULE``, ``"PDL"``: ``pdl.ENABLED`` (both also on where not
    named); ``"GROUP_SUM_EVICT"``: ``moe_triton``'s (shipped where not named)."""
    named = on if isinstance(on, dict) else {"ENABLED": on}
    for switch in ("ENABLED", "GATE_DOTS", "SORTED_ROWS", "PREFETCH_ROWS"):
        getattr(pair_slots, switch)[0] = named.get(switch, True)
    moe_ops.BACKWARD_SCHEDULE["linear_overlap"] = named.get("linear_overlap", True)
    pdl.ENABLED[0] = named.get("PDL", True)
    moe_triton.GROUP_SUM_EVICT[0] = named.get("GROUP_SUM_EVICT", _SHIPPED_EVICT)


def run_pair_ab(
    variants: list,
    setting_key: str,
    title: str,
    name: str,
    script_file: str,
    shapes: list | None = None,
) -> int:
    """Times ``variants`` (``(label, switches, moe_linear launch keywords, the setting recorded
    in the row under setting_key)``, ``switches`` whether the call runs by pairs, or a dict of
    ``pair_slots`` switches and their values; the first is the baseline the others' results are
    compared with, the first two are profiled) at the 4 x 8 V and O shapes (or ``shapes``),
    two passes alternating in one process, and writes ``ab_{name}`` and ``profile_{name}``
    (``write_ab``). Needs CUDA."""

    rows, profiles, baseline = [], [], variants[0][0]
    if shapes is None:
        shapes = [s for s in SHAPES if s.kind != "ffn" and s.name.endswith("4x8")]
    for s in shapes:
        t, params, dense_ms = shape_setup(s)
        results, times, peaks = {}, {v[0]: [] for v in variants}, {}
        for label, on, launch, _setting in variants:
            _switch(on)
            results[label] = _step_results(s, t, params, **launch)
        for _ in range(2):
            for label, on, launch, _setting in variants:
                _switch(on)
                ms, peaks[label] = time_fwd_bwd(lambda launch=launch: ours_fused(s, t, True,
                                                **launch), [*params, t["gate"]])  # fmt: skip
                times[label].append(ms)
        for label, _on, _launch, setting in variants:
            ms = min(times[label])
            errors = [_rel(a, b) for a, b in zip(results[label], results[baseline])]
            rows.append({
                "shape": s.name, "variant": label, setting_key: setting,
                "ms_passes": times[label], "ms": ms, "dense_ms": dense_ms,
                "pct_of_dense": 100 * dense_ms / ms, "peak_mib": peaks[label],
                f"rel_diff_vs_{baseline}": dict(zip(("out", "w", "x", "gate"), errors)),
            })  # fmt: skip
        for label, on, _launch, _setting in variants[:2]:
            _switch(on)
            profiles.append(f"== {s.name}, {label}\n" + _profile(s, t, params))
        _switch({})
        torch.cuda.empty_cache()
    write_ab(title, name, rows, profiles, baseline, script_file)
    return 0


def main() -> int:
    if not require_cuda(__file__):
        return 2
    variants = [
        (label, on, {} if cfg is None else {"gemm_configs": {"linear_pairs": cfg}}, cfg)
        for label, on, cfg in VARIANTS
    ]
    return run_pair_ab(variants, "config", "moe_linear pairs of experts A/B", "pair_slots",
                       __file__)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
