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
from typing import NamedTuple

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


class VInputGradient(NamedTuple):
    """The row-tile kernel's operands as V's input gradient at 4 x 8 (CUDA): the slots'
    ``index`` and ``gate``, the routing's ``slot_to_sorted``, ``lo_slots`` and ``pair_offsets``,
    the items' gradient rows ``dy``, the expert matrices as it reads them ``w_t`` (``[E, 128,
    1024]``), its outputs ``items``, the forward's kept ``products`` with the gate dots'
    ``dgate``, and the gated ``rows`` in the experts' order."""

    index: torch.Tensor
    gate: torch.Tensor
    slot_to_sorted: torch.Tensor
    lo_slots: torch.Tensor
    pair_offsets: torch.Tensor
    dy: torch.Tensor
    w_t: torch.Tensor
    items: torch.Tensor
    products: torch.Tensor
    dgate: torch.Tensor
    rows: torch.Tensor

    def call(self, module=None, *, dots: bool = False, sorted_rows: bool = False, **options):
        """``module.pair_rows`` (default ``cvmm_kernel.pair_triton``'s) over these operands as
        a function of no arguments: with the gate-dot program where ``dots``, with the
        gated-rows program where ``sorted_rows``, and ``options`` (e.g. ``prefetch``)."""
        if module is None:
            from cvmm_kernel import pair_triton as module
        return lambda: module.pair_rows(
            self.dy, self.w_t, self.items, self.index, self.gate, self.lo_slots,
            self.pair_offsets, 1, products=self.products if dots else None,
            dgate=self.dgate if dots else None, sorted_rows=self.rows if sorted_rows else None,
            slot_to_sorted=self.slot_to_sorted if sorted_rows else None, **options,
        )  # fmt: skip


def v_input_gradient_operands() -> VInputGradient:
    """The row-tile kernel's operands as V's input gradient at 4 x 8 (CUDA)."""
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
    return VInputGradient(index, gate, routing[1], routing[6], routing[7], dy, w_t, items,
                          products, dgate, rows)  # fmt: skip


def kernel_cases() -> list[dict]:
    """Times ``pair_rows`` alone (see the module docstring); returns the rows."""
    from cvmm_kernel.moe_triton import group_dot

    ops = v_input_gradient_operands()
    cases = [("plain", ops.call()), ("+ gate dots", ops.call(dots=True)),
             ("+ sorted rows", ops.call(sorted_rows=True)),
             ("+ both", ops.call(dots=True, sorted_rows=True)),
             ("group_dot alone", lambda: group_dot(ops.products, ops.dy, 2))]  # fmt: skip
    ops.call(dots=True, sorted_rows=True)()
    expected = group_dot(ops.products, ops.dy, 2)
    dots_diff = float((ops.dgate - expected).norm() / expected.norm())
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
