"""``moe_linear`` through dense matmuls over every expert, where the experts are few per row.

A routed linear layer ``out[o] = sum_s g_s * x[a(s)] @ W[e_s]`` (slots ``s``, input row
``a(s) = s // a_div``, output row ``o(s) = s // out_div``, see :mod:`cvmm_kernel.linear_ops`)
is a dense matmul with every expert's matrix once the slots are *spread*: row ``r`` of
``spread [R, E * w]`` holds, in expert ``e``'s block of ``w`` columns, the gated sum of the
rows its slots with expert ``e`` bring (zero for the experts none of its slots chose).

- Spread by **input row** (``a_div`` slots per row), from the output gradient:
  ``M[a, e] = sum_{s: a(s) = a, e_s = e} g_s * dout[o(s)]``. Then ``dx = M @ W_all^T`` and
  ``dW = x^T @ M`` (per expert block): one matmul each, ``E / a_div`` times the slots' FLOPs.
- Spread by **output row** (``out_div`` slots per row), from the input:
  ``X[o, e] = sum_{s: o(s) = o, e_s = e} g_s * x[a(s)]``. Then ``out = X @ W_all`` and
  ``dW = X^T @ dout``: ``E / out_div`` times the FLOPs.

The sparse kernels write a product per slot and sum them, memory-bound passes over ``[N, d]``;
at twice the FLOPs, cuBLAS matmuls and one spread (a ``[R, E * w]`` write) take less time.
SwitchHead's value and output projections with 4 experts per head (2 chosen) are that case:
``E / a_div = E / out_div = 2``. :func:`side` picks the layout; ``MAX_RATIO`` bounds the FLOPs.
"""

from __future__ import annotations

import torch

from .shared_grads import matmul_f32
from .triton_modules import triton_module

INPUT_ROWS, OUTPUT_ROWS = "input", "output"

# The largest FLOPs ratio (experts per spread row, E / a_div or E / out_div) taken dense: see
# benchmarks/results/ab_dense_slots.md. 0 turns the dense layouts off. Read by every forward and
# backward call (a backward must see the value its forward saw: change it between steps).
MAX_RATIO = [2.0]


def side(n_experts: int, a_div: int, out_div: int, keeps_products: bool) -> str | None:
    """The dense layout of a Triton call, or None (the sparse kernels): by input
    row where the forward keeps its per-slot products (the gate gradient reads them; that
    layout makes no ``x[a(s)] @ W[e_s]`` of its own), else by output row (whose forward makes
    no products either: the gate gradient then comes with the sparse input gradient)."""
    if keeps_products and n_experts <= MAX_RATIO[0] * a_div:
        return INPUT_ROWS
    if n_experts <= MAX_RATIO[0] * out_div:
        return OUTPUT_ROWS
    return None


def reference_spread(
    src: torch.Tensor, index: torch.Tensor, gate: torch.Tensor, n_experts: int, div: int,
    src_div: int,
) -> torch.Tensor:  # fmt: skip
    """The spread in PyTorch ops: ``src [S // src_div, w]``, ``index``, ``gate [S]`` ->
    ``[S // div, E * w]``: row ``r``, block ``e`` sums ``gate[s] * src[s // src_div]`` over
    the slots ``s`` in ``[r * div, (r + 1) * div)`` with ``index[s] == e`` (in fp32)."""
    n_slots, w = index.numel(), src.shape[1]
    slots = torch.arange(n_slots, device=src.device)
    rows = src[slots // src_div].float() * gate.float().unsqueeze(-1)
    out = torch.zeros(n_slots // div, n_experts, w, dtype=torch.float32, device=src.device)
    out.index_put_((slots // div, index.long()), rows, accumulate=True)
    return out.view(n_slots // div, n_experts * w).to(src.dtype)


def spread(src, index, gate, n_experts: int, div: int, src_div: int) -> torch.Tensor:
    """:func:`reference_spread` on the Triton path (one kernel, slot order: deterministic)."""
    kt = triton_module("moe_triton")

    return kt.spread_slots(src, index, gate, n_experts, div, src_div)


def all_experts(w: torch.Tensor) -> torch.Tensor:
    """``[E, d_in, d_out]`` -> ``[E * d_in, d_out]`` (a view): every expert's rows stacked."""
    return w.reshape(-1, w.shape[2])


def input_rows_backward(dy, x, gate, w, index, a_div, out_div, need_x, need_w):
    """``(dx, dW float32)`` by the input-row spread (``w``: the weight in ``x``'s dtype; a
    gradient that is not needed is None)."""
    n_experts, d_in, d_out = w.shape
    m = spread(dy, index, gate, n_experts, a_div, out_div)  # [N // a_div, E * d_out]
    # every expert's d_out columns side by side: a copy of contiguous rows, read transposed
    dx = m @ w.transpose(0, 1).reshape(d_in, -1).t() if need_x else None
    if not need_w:
        return dx, None
    # one batched matmul writes [E, d_in, d_out] (one matmul [d_in, E * d_out] and a transposing
    # copy took 6 us more at SwitchHead's 4 x 4 values: results/ab_dense_slots_dw_layout.md)
    per_expert = m.view(-1, n_experts, d_out).transpose(0, 1)  # [E, rows, d_out]
    return dx, matmul_f32(x.t().expand(n_experts, d_in, x.shape[0]), per_expert)


def output_rows_forward(x, gate, w, index, a_div, out_div):
    """``(out [N // out_div, d_out], the spread input [N // out_div, E * d_in])`` by the
    output-row spread (the spread is kept for the weight gradient)."""
    spread_x = spread(x, index, gate, w.shape[0], out_div, a_div)
    return spread_x @ all_experts(w), spread_x


def output_rows_weight_grad(dy: torch.Tensor, spread_x: torch.Tensor, w_shape) -> torch.Tensor:
    """``dW`` float32 ``[E, d_in, d_out]`` from the forward's spread input."""
    return matmul_f32(spread_x.t(), dy).view(w_shape)
