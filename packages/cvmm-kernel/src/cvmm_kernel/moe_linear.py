"""``moe_linear``: a gated mixture of expert linear maps per group (validation, dispatch)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .autocast_off import autocast_off
from .linear_ops import MoELinearFunction, moe_linear_forward, moe_linear_forward_traced, plan
from .moe_inputs import (
    check_index_range,
    check_one_device,
    check_routing_tensors,
    compute_dtype_and_backend,
)
from .moe_ops import (
    block_m_for,
    check_block_m,
    check_gemm_configs,
    check_weight_grad_rounding,
    encode_gemm_configs,
    moe_routing,
    moe_routing_traced,
    weight_grad_dtype,
)
from .ops import Backend
from .pair_slots import moe_pair_routing, moe_pair_routing_traced
from .pair_slots import wanted as pairs_wanted
from .shared_grads import shared_use
from .traced_ops import pick


def _divisors(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, reduce_groups: bool):
    """Checks shapes; returns ``(rows_shared, groups, k)``."""
    for name, t in (("x", x), ("index", index), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if x.dim() < 1 or index.dim() < 1:
        raise ValueError(
            f"x and index need a last dimension, got {list(x.shape)}, {list(index.shape)}"
        )
    if index.dim() >= 2 and x.shape[:-1] == index.shape[:-2] and x.dim() == index.dim() - 1:
        shared = True
    elif x.shape[:-1] == index.shape[:-1]:
        shared = False
    else:
        raise ValueError(
            "x must be [..., G, d_in] (a row per group) or [..., d_in] (one row for all groups) "
            f"for index [..., G, k], got x {list(x.shape)} and index {list(index.shape)}"
        )
    if reduce_groups and index.dim() < 2:
        raise ValueError(f"reduce_groups needs index [..., G, k], got {list(index.shape)}")
    if weight.dim() != 3:
        raise ValueError(f"weight must be [E, d_in, d_out], got {list(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has width {x.shape[-1]} but weight expects {weight.shape[1]}")
    if not (x.dtype.is_floating_point and weight.dtype.is_floating_point):
        raise TypeError(f"x and weight must be floating point, got {x.dtype}, {weight.dtype}")
    groups = index.shape[-2] if index.dim() >= 2 else 1
    return shared, groups, index.shape[-1]


def _empty_case(x, index, gate, weight, shared, reduce_groups) -> torch.Tensor:
    """No products to compute (no slots or a zero width): the definition with plain ops, which
    gives zeros of the right shape connected to the inputs (their gradients are zeros)."""
    rows = x.unsqueeze(-2) if shared else x
    w = weight.to(x.dtype)[index]  # [..., G, k, d_in, d_out]: empty
    out = torch.einsum("...gi,...gkio,...gk->...go", rows, w, gate.to(x.dtype))
    return out.sum(-2) if reduce_groups else out


def moe_linear(
    x: torch.Tensor,
    index: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    *,
    reduce_groups: bool = False,
    deterministic: bool = True,
    index_bound: int | None = None,
    backend: Backend | None = None,
    block_m: int | None = None,
    gemm_configs: Mapping[str, Sequence[int]] | None = None,
    weight_grads_in_compute_dtype: bool = False,
) -> torch.Tensor:
    """Gated sums of expert linear maps: for every group ``g`` (e.g. an attention head),
    ``out[..., g, :] = sum_j gate[..., g, j] * x_g @ weight[index[..., g, j]]`` where ``x_g`` is
    the group's own row of ``x`` or the row all groups share.

    SwitchHead's value projection is ``moe_linear(x [B, T, d], index, gate, v)`` with
    ``index, gate [B, T, heads, k]`` (global expert numbers) giving ``[B, T, heads, d_head]``;
    its output projection is ``moe_linear(att [B, T, heads, d_head], index, gate, o,
    reduce_groups=True)`` giving ``[B, T, d]``. With ``index [T, k]`` and ``x [T, d_in]`` it is a
    plain MoE linear layer (every token its own group).

    Args:
        x: ``[..., G, d_in]`` (a row per group, ``x.dim() == index.dim()``) or ``[..., d_in]``
            (one row shared by the groups, ``x.dim() == index.dim() - 1``).
        index: ``[..., G, k]`` integer expert numbers in ``[0, E)``.
        gate: ``[..., G, k]`` the weight of each chosen expert (differentiable).
        weight: ``[E, d_in, d_out]``.
        reduce_groups: also sum over the groups: ``[..., d_out]`` instead of ``[..., G, d_out]``.
        deterministic: ``True`` (default) sums the expert outputs (and input gradients) in a
            fixed order: bitwise reproducible. ``False`` adds them with fp32 atomics on the
            Triton path, which skips writing the per-expert products, except where the experts
            are few per row: there both modes take the dense slot layouts
            (:mod:`cvmm_kernel.dense_slots`, faster) and are deterministic, and where each
            group chose two of at most 64 experts: there both run by pairs of experts
            (:mod:`cvmm_kernel.pair_slots`, faster than the atomic adds), deterministic.
        index_bound: a promise that ``0 <= index < index_bound``: no read-back of the indices
            (no host sync; the call can be captured in a CUDA graph). Without it the range is
            checked.
        backend: ``"reference"`` (PyTorch, any device) or ``"triton"``; by default Triton on
            CUDA and the reference elsewhere.
        block_m, gemm_configs: this call's launch settings, as in ``moe_mlp`` (the roles
            ``moe_linear`` launches: ``linear``, ``linear_rows``, ``linear_grad_input``,
            ``linear_grad_input_rows``, ``grad_w_linear``, ``grad_w_linear_sorted``,
            ``linear_pairs``, ``linear_pair_gemm``; ``benchmarks/sweep_linear.py``,
            ``ab_pair_slots.py``, ``ab_pair_routing.py`` and ``ab_pair_prefetch.py`` sweep
            them).
        weight_grads_in_compute_dtype: as in ``moe_mlp``: the call's weight gradient rounded
            to the compute dtype before autograd gets it in the weight's dtype (for weights
            applied several times in a compiled step). Compiled, where the call takes a dense
            slot layout (its weight gradient a PyTorch matmul), Inductor fuses that rounding
            and the cast back into the sum of the uses and leaves the rounding out, as it does
            for any cast down and up again (``torch._inductor.config.emulate_precision_casts``).

    Returns:
        ``[..., G, d_out]`` (or ``[..., d_out]`` with ``reduce_groups``) in ``x``'s dtype (the
        autocast dtype under autocast, where fp32 weights are cast once per weight version).
        Gradients flow to ``x``, ``gate`` and ``weight`` (its gradient in its own dtype).
    """
    block_m = check_block_m(block_m)
    configs = check_gemm_configs(gemm_configs)
    rounded = check_weight_grad_rounding(weight_grads_in_compute_dtype)
    shared, groups, k = _divisors(x, index, weight, reduce_groups)
    check_routing_tensors(index, gate)
    check_one_device("moe_linear", x, index, gate, weight)
    check_index_range("moe_linear", index, weight.shape[0], index_bound)
    x, chosen = compute_dtype_and_backend(x, weight.dtype, backend)
    out_shape = (*index.shape[: -2 if reduce_groups else -1], weight.shape[2])
    a_div = groups * k if shared else k
    out_div = groups * k if reduce_groups else k
    if index.numel() == 0 or x.shape[-1] == 0 or weight.shape[2] == 0:
        return _empty_case(x, index, gate, weight, shared, reduce_groups)
    flat_index = index.reshape(-1).long()
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    flat_gate = gate.reshape(-1).contiguous()
    layout = plan(weight.shape, a_div, out_div, True, chosen)
    pairs = pairs_wanted(weight.shape[0], k, flat_index.numel(), chosen, layout)
    block_m = block_m_for(chosen) if block_m is None else block_m
    # a call that takes pairs is deterministic throughout (per-slot sums beat atomic adds too)
    settings = (a_div, out_div, block_m, deterministic or pairs, chosen)
    grad_dtype = weight_grad_dtype(rounded, x.dtype, weight.dtype)
    with autocast_off(x.device.type):
        if torch.compiler.is_compiling():  # ops with fake implementations (traced_ops.pick)
            if pairs:
                pair_routing = pick(moe_pair_routing, moe_pair_routing_traced, chosen)
                routing = pair_routing(flat_index, weight.shape[0], block_m)
            else:
                routing_op = pick(moe_routing, moe_routing_traced, chosen)
                routing = (*routing_op(flat_index, weight.shape[0], block_m, chosen), None, None)
            launch = (encode_gemm_configs(configs), grad_dtype)
            forward = pick(moe_linear_forward, moe_linear_forward_traced, chosen)
            out = forward(x2, flat_gate, weight, flat_index, *routing[:6], *settings, *launch,
                          *routing[6:])[0]  # fmt: skip
        else:  # the same implementations with less host time per call
            weight, shared = shared_use(weight)
            out = MoELinearFunction.apply(
                x2, flat_gate, weight, flat_index, weight.shape[0], *settings, shared, configs,
                grad_dtype, pairs,
            )  # fmt: skip
    return out.view(out_shape)
