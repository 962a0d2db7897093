"""The gathered expert linear layer (``moe_linear``) as ``torch.library`` custom ops.

Slots ``s`` in ``[0, N)``, each with an expert ``e = index[s]`` and a gate ``g = gate[s]``, read
input row ``a(s) = s // a_div`` and add into output row ``o(s) = s // out_div``::

    out[o] = sum_{s: o(s) = o} g_s * x[a(s)] @ W[e_s]

and the backward, with ``z_s = dout[o(s)] @ W[e_s]^T``::

    d gate_s = <z_s, x[a(s)]>        dx[a] = sum_{s: a(s) = a} g_s * z_s
    dW[e] = sum_{s in e} g_s * x[a(s)]^T dout[o(s)]

SwitchHead's value projection is ``a_div = heads * k`` (every slot of a token reads its row),
``out_div = k`` (a head sums its k experts); its output projection is ``a_div = k`` (a row per
head), ``out_div = heads * k`` (a token sums over heads and experts). The routing is
:func:`cvmm_kernel.moe_ops.moe_routing`; the kernels are those of ``moe_mlp``
(:mod:`cvmm_kernel.moe_triton`). The sums over slots are deterministic (products per slot, or
per pair of slots with :mod:`cvmm_kernel.pair_slots`, then a fixed-order fp32 sum) unless
``deterministic=False``, where the Triton path adds them with fp32 atomics (except on the dense
slot layouts and where the call takes pairs: there it stays deterministic).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import dense_slots, pair_slots
from .moe_ops import (
    BACKWARD_SCHEDULE,
    Routing,
    _config,
    _per_expert,
    _per_expert_outer,
    _weight_grad,
    decode_gemm_configs,
    in_weight_dtype,
    no_second_derivative,
    routing_impl,
    side_work,
)
from .shared_grads import settle
from .traced_ops import register_twins, twin_ops
from .triton_modules import triton_module
from .weight_cache import cast_weight


def _sum_groups(per_slot: torch.Tensor, div: int) -> torch.Tensor:
    """``[N, n]`` slot rows -> ``[N // div, n]``, each the fp32 sum of ``div`` consecutive rows."""
    if div == 1:
        return per_slot
    return per_slot.view(-1, div, per_slot.shape[1]).sum(1)


# ----- the PyTorch reference, one expert at a time -----


def _reference_forward(x, gate, w, r: Routing, a_div, out_div):
    s2s = r.sorted_to_slot.long()
    y = _per_expert(x[s2s // a_div], w.to(x.dtype), r.offsets) * gate[s2s].to(x.dtype)[:, None]
    per_slot = torch.empty_like(y).index_copy_(0, s2s, y)
    return _sum_groups(per_slot, out_div)


def _reference_backward(dy, x, gate, w, r: Routing, a_div, out_div, shared=None, grad_dtype=None):
    s2s = r.sorted_to_slot.long()
    rows, dy_rows = x[s2s // a_div], dy[s2s // out_div]
    z = _per_expert(dy_rows, w.to(x.dtype).transpose(1, 2), r.offsets)
    acc = torch.promote_types(z.dtype, torch.float32)
    dgate_sorted = (z.to(acc) * rows.to(acc)).sum(-1)
    dgate = torch.empty_like(dgate_sorted).index_copy_(0, s2s, dgate_sorted).to(gate.dtype)
    g = gate[s2s].to(x.dtype)[:, None]
    dx = _sum_groups(torch.empty_like(z).index_copy_(0, s2s, z * g), a_div)
    dw_dtype = grad_dtype if shared is None else None
    dw = _per_expert_outer(rows * g, dy_rows, r.offsets, torch.empty_like(w, dtype=dw_dtype))
    return dx, dgate, settle(shared, dw, False)


# ----- the Triton path -----


def _slot_sums(a, w, r: Routing, a_div, out_div, n_out, deterministic, gate, role, h=None,
               configs=None, index=None, products=None, sorted_rows=False):  # fmt: skip
    """``out[s // out_div] += g_s * a[s // a_div] @ w[e_s]`` for every slot: per-slot products
    then a sum (deterministic), or fp32 atomic adds; by pairs of slots where ``r`` is the
    routing of a call by pairs (:mod:`cvmm_kernel.pair_slots`, which needs ``index``). Returns
    ``([n_out, N]`` in ``a``'s dtype, the gate gradient ``<a[s // a_div] @ w[e_s], h[s //
    out_div]>`` where ``h`` is given; by pairs, ``<products[s], a[s // a_div]>`` where the
    forward's kept ``products`` are given and the kernel takes them, else None). ``configs``:
    the call's launch settings per role (None: ``GEMM_CONFIGS``)."""
    kt = triton_module("moe_triton")

    k, n = a.shape[1], w.shape[2]
    if r.sorted_lo_slot is not None:
        out, _y, dgate, rows = pair_slots.pair_sums(a, w, r, index, gate, a_div, out_div,
                                                    configs, h=h, h_div=out_div,
                                                    products=products,
                                                    sorted_rows=sorted_rows)  # fmt: skip
        return out, dgate, rows
    n_slots = r.sorted_to_slot.numel()
    if deterministic:
        out, out_mode = a.new_empty(n_slots, n), kt.OUT_SLOT
    else:
        out = torch.zeros(n_out, n, dtype=torch.float32, device=a.device)
        out_mode = kt.OUT_TOKEN_ATOMIC
    dgate = None
    if k <= kt.ROWS_MAX_K:
        if h is not None:
            dgate = torch.empty(n_slots, dtype=torch.float32, device=a.device)
        kt.moe_gemm_rows(a, w, out, r, a_div, a_gather=True, out_mode=out_mode, gate=gate,
                         out_div=out_div, h=h, h_div=out_div, dgate=dgate,
                         config=_config(f"{role}_rows", k, n, configs))  # fmt: skip
    else:
        cfg = _config(role, k, n, configs)
        epilogue = kt.EPI_GATE if gate is not None else kt.EPI_NONE
        if h is not None:  # the gate gradient, in parts per column block
            dgate = torch.empty(-(-n // cfg[0]), n_slots, dtype=torch.float32, device=a.device)
            epilogue = kt.EPI_ACTIVATION_BACKWARD
        kt.moe_gemm(a, w, out, r, a_div, a_gather=True, out_mode=out_mode, epilogue=epilogue,
                    gate=gate, aux=dgate, h=h, out_div=out_div, h_div=out_div if h is not None
                    else None, config=cfg)  # fmt: skip
        if dgate is not None:
            dgate = dgate[0] if dgate.shape[0] == 1 else dgate.sum(0)
    if not deterministic:
        return out.to(a.dtype), dgate, None
    if out_div == 1:
        return out, dgate, None
    return kt.gated_group_sum(out, None, out_div), dgate, None


def plan(w_shape, a_div: int, out_div: int, deterministic: bool, backend: str):
    """``(keeps, dense)`` for a weight ``[E, d_in, d_out]``: whether the forward keeps the
    per-slot products ``y_s = x[a(s)] @ W[e_s]`` for the backward, whose gate gradient is then
    ``<dout[o(s)], y_s>`` (where the products are no wider than the inputs: the other way,
    ``<z_s, x[a(s)]>``, reads the wider inputs); and the dense layout of
    :mod:`cvmm_kernel.dense_slots` the call takes, or None. The output-row layout keeps its
    spread input instead of products. A dense layout serves ``deterministic=False`` too (its
    matmuls are faster than the atomic sums they replace, and deterministic anyway); without
    one, that mode keeps nothing (its sums are atomic adds, no per-slot products)."""
    n_experts, d_in, d_out = w_shape
    if backend != "triton":
        return False, None
    keeps = d_out <= d_in
    dense = dense_slots.side(n_experts, a_div, out_div, keeps)
    if dense is None and not deterministic:
        return False, None
    return keeps and dense != dense_slots.OUTPUT_ROWS, dense


def _triton_forward(x, gate, w, index, r: Routing, a_div, out_div, deterministic, configs=None):
    """``(out, y)``: ``y`` what the backward reads (:func:`plan`): the per-slot products, the
    output-row layout's spread input, or empty."""
    kt = triton_module("moe_triton")

    wc = cast_weight(w, x.dtype)
    n_slots, d_out = r.sorted_to_slot.numel(), w.shape[2]
    keeps, dense = plan(w.shape, a_div, out_div, deterministic, "triton")
    if dense == dense_slots.OUTPUT_ROWS:
        return dense_slots.output_rows_forward(x, gate, wc, index, a_div, out_div)
    if not keeps:
        out = _slot_sums(x, wc, r, a_div, out_div, n_slots // out_div, deterministic, gate,
                         "linear", configs=configs, index=index)[0]  # fmt: skip
        return out, x.new_empty(0, d_out)
    if r.sorted_lo_slot is not None:  # the gated sums by pairs, keeping each slot's product
        out, y, _, _ = pair_slots.pair_sums(x, wc, r, index, gate, a_div, out_div, configs,
                                            keep_products=True)  # fmt: skip
        return out, y
    # ungated per-slot products (kept), then each output row's gate-weighted sum
    y = _slot_sums(x, wc, r, a_div, 1, n_slots, True, None, "linear", configs=configs)[0]
    return kt.gated_group_sum(y, gate, out_div), y


def _triton_backward(dy, x, gate, w, index, y, r: Routing, a_div, out_div, deterministic,
                     need=(True, True, True), shared=None, configs=None,
                     grad_dtype=None):  # fmt: skip
    """``(dx, dgate, dW)``, each ``None`` where ``need`` (for ``x``, ``gate``, ``w``) says no
    gradient is wanted (a frozen weight, an input that needs none): no kernel runs for it.
    ``configs``: the call's launch settings per role; ``grad_dtype``: ``dW``'s where ``shared``
    does not sum it (None: the weight's)."""
    kt = triton_module("moe_triton")

    need_x, need_gate, need_w = need
    wc = cast_weight(w, x.dtype)
    dense = plan(w.shape, a_div, out_div, deterministic, "triton")[1]
    # a call on a dense layout is deterministic throughout: its sparse input gradient (output
    # rows) too, where the sum is faster than atomic adds
    deterministic = deterministic or dense is not None
    if dense == dense_slots.INPUT_ROWS:  # (the forward kept the products: the gate from them)
        dx, dw = dense_slots.input_rows_backward(dy, x, gate, wc, index, a_div, out_div, need_x,
                                                 need_w)  # fmt: skip
        dgate = kt.group_dot(y, dy, out_div).to(gate.dtype) if need_gate else None
        return dx, dgate, _dense_weight_grad(dw, w, shared, grad_dtype)
    # z = dy[o(s)] @ W^T: g * z summed into the input row's gradient; the gate's gradient from
    # the saved products (by pairs: in the same launch), or <z, x[a(s)]> in the same kernel
    saved = y.shape[0] > 0 and dense is None
    pairs = r.sorted_lo_slot is not None
    fused = saved and need_gate and pairs and pair_slots.GATE_DOTS[0]
    h = x if need_gate and not saved else None
    # by pairs, where the forward kept its products, the weight gradient reads g * dy[o(s)] in
    # the experts' order, written by the input gradient's row-tile kernel (it has those rows at
    # hand): one operand gathered and no gate in its loop (as moe_mlp's dW_down,
    # moe_ops.W_DOWN_FROM_GATED_H; O's form, dW^T = dy^T (g x) from the gate gradient's kernel,
    # measured slower: benchmarks/results/ab_pair_rows_first.md)
    sorted_rows = saved and pairs and need_w and pair_slots.SORTED_ROWS[0]
    in_launch = sorted_rows and pair_slots.takes_rows_kernel(dy.shape[1], False, h)
    dx = dgate = rows = None
    launches_dx = need_x or h is not None or fused
    # the input gradient (with the gate's) and a weight gradient that does not read its rows are
    # independent: on a side stream the first fills what the second leaves idle, as in
    # moe_mlp's backward (BACKWARD_SCHEDULE["linear_overlap"])
    overlap = (BACKWARD_SCHEDULE["linear_overlap"] and launches_dx and need_w and not sorted_rows
               and dense != dense_slots.OUTPUT_ROWS)  # fmt: skip
    on_side, join = side_work(x.device, overlap)
    with on_side:
        if launches_dx:
            # without x's gradient, the same launch with no columns: its gate dots alone (the
            # same program, so the same bits as with x's gradient)
            w_t = wc.transpose(1, 2) if need_x or h is not None else wc.transpose(1, 2)[:, :, :0]
            dx, dgate, rows = _slot_sums(dy, w_t, r, out_div, a_div, x.shape[0], deterministic,
                                         gate, "linear_grad_input", h=h, configs=configs,
                                         index=index, products=y if fused else None,
                                         sorted_rows=in_launch)  # fmt: skip
        if need_gate:
            if saved and dgate is None:
                dgate = kt.group_dot(y, dy, out_div)
            assert dgate is not None  # computed with dx above
            dgate = dgate.to(gate.dtype)
    if not need_w:
        return dx if need_x else None, dgate, None
    if dense == dense_slots.OUTPUT_ROWS:  # from the spread input the forward kept
        dw = dense_slots.output_rows_weight_grad(dy, y, w.shape)
        return dx if need_x else None, dgate, _dense_weight_grad(dw, w, shared, grad_dtype)
    wgrad = dict(shared=shared, r=r, role="grad_w_linear", configs=configs, grad_dtype=grad_dtype)
    if sorted_rows:  # dW = x[a(s)]^T (g dy[o(s)]): the gathered rows first
        rows = _gated_sorted_rows(dy, gate, r, out_div) if rows is None else rows
        wgrad["role"] = "grad_w_linear_sorted"
        dw = _weight_grad(x, rows, w, top_k=a_div, a_gather=True, b_gather=False, **wgrad)
    else:
        dw = _weight_grad(x, dy, w, top_k=a_div, a_gather=True, b_gather=True, gate=gate,
                          b_div=out_div, **wgrad)  # fmt: skip
    join(dx, dgate)
    return dx if need_x else None, dgate, dw


def _gated_sorted_rows(src, gate, r: Routing, div):
    """``[N, src.shape[1]]``: ``gate[s] * src[s // div]`` at sorted position ``s``'s place (the
    experts' order of ``r``), rounded as the row-tile kernel writes them (a fp32 product): for a
    backward whose launch does not write them (no input gradient wanted, or a wider inner
    size), so that the weight gradient is the same either way."""
    s2s = r.sorted_to_slot.long()
    return (src[s2s // div].float() * gate[s2s].float()[:, None]).to(src.dtype)


def _dense_weight_grad(dw, w, shared, grad_dtype):
    """What a dense layout's float32 weight gradient gives autograd (see :func:`_weight_grad`):
    None where ``shared`` sums it, else ``dw`` in ``grad_dtype`` (None: the weight's)."""
    if dw is None:
        return None
    if shared is not None:
        return settle(shared, dw.to(w.dtype), False)
    return dw.to(w.dtype if grad_dtype is None else grad_dtype)


def _forward(x, gate, w, index, r: Routing, a_div, out_div, deterministic, backend,
             configs=None):  # fmt: skip
    """``(out, y)``, ``y`` what the backward reads: the per-slot products, the output-row
    layout's spread input, or an empty ``[0, d_out]``."""
    if backend == "triton":
        return _triton_forward(x, gate, w, index, r, a_div, out_div, deterministic, configs)
    return _reference_forward(x, gate, w, r, a_div, out_div), x.new_empty(0, w.shape[2])


def _gradients(grad_out, x, gate, w, index, y, r: Routing, a_div, out_div, deterministic,
               backend, need=(True, True, True), shared=None, configs=None,
               grad_dtype=None):  # fmt: skip
    """``(dx, dgate, dW)``; ``dW`` is None where ``shared`` (a SharedGrad) sums it instead, else
    in ``grad_dtype`` (None: the weight's)."""
    dy = grad_out.to(x.dtype).contiguous()
    if backend == "triton":
        return _triton_backward(dy, x, gate, w, index, y, r, a_div, out_div, deterministic, need,
                                shared, configs, grad_dtype)  # fmt: skip
    return _reference_backward(dy, x, gate, w, r, a_div, out_div, shared, grad_dtype)


# ----- the custom ops -----


def _forward_op(
    x: torch.Tensor,
    gate: torch.Tensor,
    w: torch.Tensor,
    index: torch.Tensor,
    sorted_to_slot: torch.Tensor,
    slot_to_sorted: torch.Tensor,
    offsets: torch.Tensor,
    tile_expert: torch.Tensor,
    tile_start: torch.Tensor,
    n_valid: torch.Tensor,
    a_div: int,
    out_div: int,
    block_m: int,
    deterministic: bool,
    backend: str,
    gemm_configs: Sequence[int] | None = None,
    weight_grad_dtype: torch.dtype | None = None,
    sorted_lo_slot: torch.Tensor | None = None,
    pair_offsets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [N // a_div, d_in]``, ``gate``, ``index [N]`` -> ``(out [N // out_div, d_out], y)``
    with ``y`` the per-slot products ``[N, d_out]`` where the backward uses them, the spread
    input ``[N // out_div, E * d_in]`` of the output-row dense layout, else ``[0, d_out]``.
    ``gemm_configs``: the call's launch settings (``moe_ops.encode_gemm_configs``), kept for the
    backward (None: the shipped ones); ``weight_grad_dtype``: the backward's, see
    :func:`moe_linear_backward`; ``sorted_lo_slot`` and ``pair_offsets``: the routing of a call
    by pairs of experts (:mod:`cvmm_kernel.pair_slots`; the tile table is then the pairs')."""
    r = Routing(sorted_to_slot, slot_to_sorted, offsets, tile_expert, tile_start, n_valid, block_m,
                sorted_lo_slot, pair_offsets)  # fmt: skip
    configs = decode_gemm_configs(gemm_configs)
    return _forward(x, gate, w, index, r, a_div, out_div, deterministic, backend, configs)


moe_linear_forward, moe_linear_forward_traced = twin_ops(
    "cvmm_kernel::moe_linear_forward", _forward_op
)


def _forward_fake(x, gate, w, index, sorted_to_slot, *rest):
    a_div, out_div, _block_m, deterministic, backend = rest[5:10]
    n, (n_experts, d_in, d_out) = gate.shape[0], w.shape
    keeps, dense = plan(w.shape, a_div, out_div, deterministic, backend)
    if dense == dense_slots.OUTPUT_ROWS:
        y = x.new_empty(n // out_div, n_experts * d_in)
    else:
        y = x.new_empty(n if keeps else 0, d_out)
    return x.new_empty(n // out_div, d_out), y


def _backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    gate: torch.Tensor,
    w: torch.Tensor,
    index: torch.Tensor,
    y: torch.Tensor,
    sorted_to_slot: torch.Tensor,
    slot_to_sorted: torch.Tensor,
    offsets: torch.Tensor,
    tile_expert: torch.Tensor,
    tile_start: torch.Tensor,
    n_valid: torch.Tensor,
    a_div: int,
    out_div: int,
    block_m: int,
    deterministic: bool,
    backend: str,
    gemm_configs: Sequence[int] | None = None,
    weight_grad_dtype: torch.dtype | None = None,
    sorted_lo_slot: torch.Tensor | None = None,
    pair_offsets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dx, dgate, dW)``; ``dW`` in ``weight_grad_dtype``, by default the weight's
    own; the pairs' routing as the forward's."""
    r = Routing(sorted_to_slot, slot_to_sorted, offsets, tile_expert, tile_start, n_valid, block_m,
                sorted_lo_slot, pair_offsets)  # fmt: skip
    configs = decode_gemm_configs(gemm_configs)
    return _gradients(grad_out, x, gate, w, index, y, r, a_div, out_div, deterministic, backend,
                      configs=configs, grad_dtype=weight_grad_dtype)  # fmt: skip


moe_linear_backward, moe_linear_backward_traced = twin_ops(
    "cvmm_kernel::moe_linear_backward", _backward_op
)


def _backward_fake(grad_out, x, gate, w, index, y, sorted_to_slot, slot_to_sorted, offsets,
                   tile_expert, tile_start, n_valid, a_div, out_div, block_m, deterministic,
                   backend, gemm_configs=None, weight_grad_dtype=None, sorted_lo_slot=None,
                   pair_offsets=None):  # fmt: skip
    return torch.empty_like(x), torch.empty_like(gate), torch.empty_like(w, dtype=weight_grad_dtype)


def _setup_context(ctx, inputs, output):
    x, gate, w, index, *routing = inputs[:10]
    # the settings: a_div, out_div, block_m, deterministic, backend, launch; then the pairs'
    # routing tensors (None where the call is not by pairs)
    ctx.save_for_backward(x, gate, w, index, output[1], *routing, *inputs[17:19])
    ctx.settings = inputs[10:17]


def _autograd_backward(backward_op):
    """The forward op's autograd formula, through ``backward_op`` (its twin's backward)."""

    def backward(ctx, grad_out, _grad_y):
        x, gate, w, index, y, *routing = ctx.saved_tensors
        dx, dgate, dw = backward_op(grad_out, x, gate, w, index, y, *routing[:6],
                                    *ctx.settings, *routing[6:])  # fmt: skip
        dw = in_weight_dtype(dw, w)
        need = ctx.needs_input_grad
        grads = [g if need[i] else None for i, g in enumerate((dx, dgate, dw))]
        return (*grads, *[None] * (9 + len(ctx.settings)))

    return backward


register_twins(
    (moe_linear_forward, moe_linear_forward_traced),
    (moe_linear_backward, moe_linear_backward_traced),
    _forward_fake,
    _backward_fake,
    _autograd_backward,
    _setup_context,
)


class MoELinearFunction(torch.autograd.Function):
    """The eager path: the same implementations as the custom ops with less host time per call
    (see :class:`cvmm_kernel.moe_ops.MoEMLPFunction`)."""

    @staticmethod
    def forward(ctx, x, gate, w, index, n_experts, a_div, out_div, block_m, deterministic,
                backend, shared=None, configs=None, grad_dtype=None, pairs=False):  # fmt: skip
        """``shared``: a SharedGrad that sums the weight's gradient over its uses, or None.
        ``configs``: the call's launch settings per role (checked), or None; ``grad_dtype``:
        the weight gradient's rounding (None: none); ``pairs``: the call runs by pairs of
        experts (:func:`cvmm_kernel.pair_slots.wanted`)."""
        if pairs:  # (not a custom op: its routing tensors may be views of one allocation)
            routing = pair_slots.routing_impl(index, n_experts, block_m, apart=False)
        else:
            routing = routing_impl(index, n_experts, block_m, backend, apart=False)
        r = Routing(*routing[:6], block_m, *routing[6:])
        out, y = _forward(x, gate, w, index, r, a_div, out_div, deterministic, backend, configs)
        ctx.save_for_backward(x, gate, w, index, y, *routing)
        ctx.settings = (a_div, out_div, block_m, deterministic, backend)
        ctx.shared = shared
        ctx.launch = (configs, grad_dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, gate, w, index, y, *routing = ctx.saved_tensors
        a_div, out_div, block_m, deterministic, backend = ctx.settings
        no_second_derivative(backend)
        r = Routing(*routing[:6], block_m, *routing[6:])
        need = ctx.needs_input_grad
        dx, dgate, dw = _gradients(grad_out, x, gate, w, index, y, r, a_div, out_div,
                                   deterministic, backend, need[:3], ctx.shared,
                                   *ctx.launch)  # fmt: skip
        grads = (dx, dgate, in_weight_dtype(dw, w))
        return (*[g if need[i] else None for i, g in enumerate(grads)], *[None] * 11)
