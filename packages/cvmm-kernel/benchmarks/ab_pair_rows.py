r"""The pairs' input-gradient launch at SwitchHead's 4 x 8 shapes: the gate gradient and the
weight gradient's gated rows (in the experts' order) written by it, and launch settings.

    PYTHONPATH=$(ls -d packages/*/src tools/*/src | tr '\n' ':'):packages/cvmm-kernel/benchmarks \
        python3 packages/cvmm-kernel/benchmarks/ab_pair_rows.py

Two parts, one process, bf16:

- steps (``ab_pair_slots.run_pair_ab``: forward + backward, CUDA-graph replays, two passes
  alternating, the gate's gradient taken as in the layer): V's gate gradient from the kept
  products in a kernel of its own or in the input gradient's launch (``pair_slots.GATE_DOTS``),
  the weight gradient with the gate in its loop and both operands gathered or from the gated
  rows that launch writes (``pair_slots.SORTED_ROWS``), then the shipped path with other
  ``grad_w_linear`` settings. Writes ``ab_pair_rows.{json,md}`` and ``profile_pair_rows.txt``.
- the row-tile kernel alone (``kernel_us_twice``) on the 4 x 8 operands (32768 items of
  128-wide rows, 32 experts of 128 x 1024, transposed as V's input gradient reads them): plain,
  with the gate-gradient program, with the gated rows, with both; ``group_dot`` alone. Writes
  ``ab_pair_rows_kernel.json``. (A first version of this part also timed the gates folded into
  the rows with one accumulator, a kernel option since removed: 11-100% slower,
  ``ab_pair_rows_kernel_fold.json``.)

Files go to ``$OUT`` (else ``benchmarks/results``).
"""

from __future__ import annotations

import sys

import torch
from ab_pair_slots import run_pair_ab
from bench_cvmm import SHAPES, make_inputs
from bench_harness import kernel_us_twice, metadata, require_cuda, write_results

# (label, pair_slots switches, launch keywords)
STEP_VARIANTS = [
    ("both apart", {"GATE_DOTS": False, "SORTED_ROWS": False}, {}),
    ("shipped", {}, {}),
    ("gate dots only", {"SORTED_ROWS": False}, {}),
    ("sorted rows only", {"GATE_DOTS": False}, {}),
    *[
        (f"shipped, grad_w_linear {cfg}", {}, {"gemm_configs": {"grad_w_linear": cfg}})
        for cfg in [
            (128, 128, 128, 4, 3),
            (64, 128, 128, 8, 3),
            (32, 128, 128, 4, 4),
            (64, 128, 128, 4, 3),
            (64, 64, 128, 4, 4),
        ]
    ],
]


def v_input_gradient_operands() -> tuple:
    """The row-tile kernel's operands as V's input gradient at 4 x 8 (CUDA): ``(index, gate,
    slot_to_sorted, lo_slots, pair_offsets, dy, W^T, items, products, dgate, rows)``."""
    from cvmm_kernel import pair_slots

    s = next(s for s in SHAPES if s.name == "switchhead-v-4x8")
    t = make_inputs(s, "cuda")
    index = t["index"].reshape(-1).contiguous()
    gate = t["gate"].reshape(-1).contiguous()
    routing = pair_slots.routing_impl(index, s.n_experts * s.heads, 128)
    dy = torch.randn(index.numel() // 2, s.expert_size, device="cuda", dtype=torch.bfloat16)
    w_t = t["w"].transpose(1, 2)  # [E, 128, 1024]: V's input gradient reads W^T
    items = dy.new_empty(dy.shape[0], s.d_model)
    products = torch.randn(index.numel(), s.expert_size, device="cuda", dtype=dy.dtype)
    dgate = torch.empty(index.numel(), device="cuda", dtype=torch.float32)
    rows = torch.empty_like(products)
    return (index, gate, routing[1], routing[6], routing[7], dy, w_t, items, products, dgate,
            rows)  # fmt: skip


def kernel_cases() -> list[dict]:
    """Times ``pair_rows`` alone (see the module docstring); returns the rows."""
    from cvmm_kernel import pair_triton as pt
    from cvmm_kernel.moe_triton import group_dot

    index, gate, s2s, lo_slots, pair_offsets, dy, w_t, items, products, dgate, rows = (
        v_input_gradient_operands()
    )

    def run(dots: bool, sorted_rows: bool):
        return lambda: pt.pair_rows(
            dy, w_t, items, index, gate, lo_slots, pair_offsets, 1,
            products=products if dots else None, dgate=dgate if dots else None,
            sorted_rows=rows if sorted_rows else None,
            slot_to_sorted=s2s if sorted_rows else None,
        )  # fmt: skip

    cases = [("plain", run(False, False)), ("+ gate dots", run(True, False)),
             ("+ sorted rows", run(False, True)), ("+ both", run(True, True)),
             ("group_dot alone", lambda: group_dot(products, dy, 2))]  # fmt: skip
    run(True, True)()
    expected = group_dot(products, dy, 2)
    dots_diff = float((dgate - expected).norm() / expected.norm())
    timed = kernel_us_twice(cases, label_width=40)
    print(f"gate dots vs group_dot: rel. diff {dots_diff:.1e}")
    write_results("ab_pair_rows_kernel", {"meta": metadata(dtype="bfloat16"), "rows": timed,
                  "gate_dots_rel_diff_vs_group_dot": dots_diff}, None,
                  script_file=__file__)  # fmt: skip
    return timed


def main() -> int:
    if not require_cuda(__file__):
        return 2
    kernel_cases()
    variants = [(label, on, launch, launch.get("gemm_configs")) for label, on, launch in
                STEP_VARIANTS]  # fmt: skip
    return run_pair_ab(variants, "setting", "moe_linear pair row tiles A/B", "pair_rows",
                       __file__)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
