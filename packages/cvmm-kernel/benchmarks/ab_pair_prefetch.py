r"""The pairs' row-tile kernel with its items' loads prefetched by hand or pipelined by Triton,
at SwitchHead's 4 x 8 shapes (V's input gradient and O's forward run on it).

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':'):packages/cvmm-kernel/benchmarks \
        python3 packages/cvmm-kernel/benchmarks/ab_pair_prefetch.py [--roles | --4x10 |
            --overlap | --pdl | --old]

Two parts, one process, bf16:

- the kernel alone (``kernel_us_twice``) on V's input-gradient operands (32768 items of
  128-wide rows, 32 experts of 1024 x 128 read transposed), without and with the gate-dot and
  sorted-row programs, each way (``pair_rows(prefetch=)``);
- steps (``ab_pair_slots.run_pair_ab``: forward + backward, CUDA-graph replays, two passes
  alternating, the gate's gradient taken as in the layer): pipelined
  (``pair_slots.PREFETCH_ROWS`` off, the baseline), prefetched (shipped), and prefetched with
  other ``linear_pairs`` settings. Writes ``ab_pair_prefetch.{json,md}``,
  ``profile_pair_prefetch.txt`` and ``ab_pair_prefetch_kernel.json``.

``--roles``: steps only, the shipped settings (the baseline) against the settings before
(pipelined, ``linear_pairs`` ``(128, 64, 4, 3)``, both weight gradients on ``(64, 128, 128, 4,
4)``) and other settings of the pairs' roles; writes ``ab_pair_roles.{json,md}`` and
``profile_pair_roles.txt``. ``--4x10``: the first two of those and three more at 4 heads x 10
experts (MoEUT-244M's attention) and x 8; writes ``ab_pair_roles_4x10.{json,md}``.
``--overlap``: steps at 4 x 8 and 4 x 10, the backward in order with the pairs' GEMM at 3
stages (before, the baseline) against the input gradient on a side stream
(``moe_ops.BACKWARD_SCHEDULE["linear_overlap"]``: O's; V's weight gradient reads that launch's
sorted rows) and other settings of ``linear_pair_gemm`` and ``grad_w_linear``; writes
``ab_linear_overlap.{json,md}`` and ``profile_linear_overlap.txt``. ``--pdl``: the same shapes,
the kernels launched one after the other against chained by programmatic dependent launch
(``cvmm_kernel.pdl``); writes ``ab_launches_pdl.{json,md}`` and ``profile_launches_pdl.txt``
(``ab_routing_pdl.*``: the same when only the routing's kernels took part).
``--old``: the kernel alone with its extra programs against an earlier commit's
(``ab_moe_old_new.py --prepare REV`` puts it on the path as ``cvmm_kernel_old``), interleaved,
and whether both give the same bits; writes ``ab_pair_prefetch_old_kernel.json``.

Files go to ``$OUT`` (else ``benchmarks/results``).
"""

from __future__ import annotations

import sys

import torch
from ab_pair_rows import v_input_gradient_operands
from ab_pair_slots import run_pair_ab
from bench_cvmm import switchhead_shapes
from bench_harness import kernel_us_twice, metadata, require_cuda, write_results

# (label, pair_slots switches, linear_pairs setting (BLOCK_N, BLOCK_M, warps, stages) or None)
STEP_VARIANTS = [
    ("pipelined", {"PREFETCH_ROWS": False}, None),
    ("prefetched", {}, None),
    *[
        (f"prefetched {cfg}", {}, cfg)
        for cfg in [
            (128, 64, 8, 3),
            (128, 128, 8, 3),
            (128, 32, 4, 3),
            (64, 64, 4, 3),
            (64, 128, 8, 3),
            (256, 64, 8, 3),
        ]
    ],
]


ROLE_VARIANTS = [
    ("shipped", {}, None),
    ("before (pipelined, 4 warps, one weight-gradient role)",
     {"PREFETCH_ROWS": False, "linear_overlap": False},
     {"linear_pairs": (128, 64, 4, 3), "grad_w_linear": (64, 128, 128, 4, 4),
      "grad_w_linear_sorted": (64, 128, 128, 4, 4), "linear_pair_gemm": (128, 64, 8, 3)}),
    *[(f"{role} {cfg}", {}, {role: cfg}) for role, cfg in [
        ("grad_w_linear", (64, 128, 128, 4, 4)),
        ("grad_w_linear", (128, 128, 128, 8, 3)),
        ("grad_w_linear", (128, 128, 64, 4, 3)),
        ("grad_w_linear_sorted", (128, 64, 128, 4, 3)),
        ("linear_pair_gemm", (128, 64, 8, 4)),
        ("linear_pairs", (128, 64, 8, 2)),
    ]],
]  # fmt: skip


SHAPE_VARIANTS = [
    ("prefetched, 4 warps", {}, {"linear_pairs": (128, 64, 4, 3)}),
    ("pipelined, 8 warps", {"PREFETCH_ROWS": False}, None),
    ("shipped, grad_w_linear_sorted (64, 128, 128, 4, 4)", {},
     {"grad_w_linear_sorted": (64, 128, 128, 4, 4)}),
]  # fmt: skip


IN_ORDER = {"linear_overlap": False}
OVERLAP_VARIANTS = [
    ("in order, linear_pair_gemm (128, 64, 8, 3) (before)", IN_ORDER,
     {"linear_pair_gemm": (128, 64, 8, 3)}),
    ("shipped (side stream, linear_pair_gemm (128, 64, 8, 4))", {}, None),
    ("side stream, linear_pair_gemm (128, 64, 8, 3)", {}, {"linear_pair_gemm": (128, 64, 8, 3)}),
    ("in order, linear_pair_gemm (128, 64, 8, 4)", IN_ORDER, None),
    ("side stream, linear_pair_gemm (128, 64, 8, 2)", {}, {"linear_pair_gemm": (128, 64, 8, 2)}),
    ("side stream, grad_w_linear (128, 128, 64, 4, 3)", {},
     {"grad_w_linear": (128, 128, 64, 4, 3)}),
    ("before, again", IN_ORDER, {"linear_pair_gemm": (128, 64, 8, 3)}),
]  # fmt: skip


PDL_VARIANTS = [
    ("launches one after the other", {"PDL": False}, None),
    ("launches chained (PDL)", {}, None),
    ("one after the other, again", {"PDL": False}, None),
]  # fmt: skip


def kernel_cases() -> list[dict]:
    """Times ``pair_rows`` alone (see the module docstring); returns the rows."""
    ops = v_input_gradient_operands()
    results = []
    for prefetch in (False, True):
        ops.call(prefetch=prefetch)()
        results.append(ops.items.clone())
    same = torch.equal(*results)
    extras = dict(dots=True, sorted_rows=True)
    cases = [("plain, pipelined", ops.call(prefetch=False)),
             ("plain, prefetched", ops.call(prefetch=True)),
             ("+ extras, pipelined", ops.call(prefetch=False, **extras)),
             ("+ extras, prefetched", ops.call(prefetch=True, **extras))]  # fmt: skip
    timed = kernel_us_twice(cases, label_width=40)
    print(f"prefetched products equal to pipelined: {same}")
    write_results("ab_pair_prefetch_kernel", {"meta": metadata(dtype="bfloat16"), "rows": timed,
                  "same_products": same}, None, script_file=__file__)  # fmt: skip
    return timed


def old_kernel_cases() -> list[dict]:
    """Times this ``pair_rows`` and ``cvmm_kernel_old``'s, with the extra programs."""
    from pathlib import Path

    import cvmm_kernel_old
    from cvmm_kernel import pair_triton as pt
    from cvmm_kernel_old import pair_triton as old_pt

    ops = v_input_gradient_operands()
    results = []
    for module in (old_pt, pt):
        ops.call(module, dots=True, sorted_rows=True)()
        results.append([ops.items.clone(), ops.dgate.clone(), ops.rows.clone()])
    same = all(torch.equal(a, b) for a, b in zip(*results))
    rev = (Path(cvmm_kernel_old.__file__).parent / "REVISION").read_text().strip()
    timed = kernel_us_twice([(f"+ extras, old ({rev})", ops.call(old_pt, dots=True,
                                                                  sorted_rows=True)),
                             ("+ extras, new", ops.call(pt, dots=True, sorted_rows=True))],
                            label_width=40)  # fmt: skip
    print(f"same bits: {same}")
    write_results("ab_pair_prefetch_old_kernel", {"meta": metadata(dtype="bfloat16", old=rev),
                  "rows": timed, "same_bits": same}, None, script_file=__file__)  # fmt: skip
    return timed


def main() -> int:
    if not require_cuda(__file__):
        return 2
    if "--old" in sys.argv[1:]:
        old_kernel_cases()
        return 0
    if "--roles" in sys.argv[1:]:
        variants = [(label, on, {} if cfg is None else {"gemm_configs": cfg}, cfg)
                    for label, on, cfg in ROLE_VARIANTS]  # fmt: skip
        return run_pair_ab(variants, "settings", "moe_linear pairs: launch roles A/B",
                           "pair_roles", __file__)  # fmt: skip
    if "--overlap" in sys.argv[1:]:
        variants = [(label, on, {} if cfg is None else {"gemm_configs": cfg}, cfg)
                    for label, on, cfg in OVERLAP_VARIANTS]  # fmt: skip
        shapes = switchhead_shapes((8, 10), ("v", "o"))
        return run_pair_ab(
            variants,
            "settings",
            "moe_linear: the input gradient on a side stream, and the pairs' GEMM",
            "linear_overlap",
            __file__,
            shapes,
        )
    if "--pdl" in sys.argv[1:]:
        variants = [(label, on, {}, None) for label, on, _cfg in PDL_VARIANTS]
        shapes = switchhead_shapes((8, 10), ("v", "o"))
        return run_pair_ab(variants, "settings", "moe_linear: launches chained by PDL",
                           "launches_pdl", __file__, shapes)  # fmt: skip
    if "--4x10" in sys.argv[1:]:
        variants = [(label, on, {} if cfg is None else {"gemm_configs": cfg}, cfg)
                    for label, on, cfg in [*ROLE_VARIANTS[:2], *SHAPE_VARIANTS]]  # fmt: skip
        shapes = switchhead_shapes((10, 8), ("v", "o"))
        return run_pair_ab(variants, "settings", "moe_linear pairs at 4 x 10 and 4 x 8",
                           "pair_roles_4x10", __file__, shapes)  # fmt: skip
    kernel_cases()
    variants = [(label, on, {} if cfg is None else {"gemm_configs": {"linear_pairs": cfg}}, cfg)
                for label, on, cfg in STEP_VARIANTS]  # fmt: skip
    return run_pair_ab(variants, "config", "moe_linear pair row tiles: prefetch A/B",
                       "pair_prefetch", __file__)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
