"""``moe_mlp``: the fused sigma-MoE feedforward (validation, autocast, dispatch)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from .autocast_off import autocast_off
from .moe_inputs import (
    check_index_range,
    check_one_device,
    check_routing_tensors,
    compute_dtype_and_backend,
)
from .moe_ops import (
    ACTIVATION_NAMES,
    MoEMLPFunction,
    block_m_for,
    check_block_m,
    check_gemm_configs,
    check_weight_grad_rounding,
    encode_gemm_configs,
    moe_mlp_forward,
    moe_mlp_forward_traced,
    moe_routing,
    moe_routing_traced,
    weight_grad_dtype,
)
from .ops import Backend
from .shared_grads import shared_use
from .traced_ops import pick

Activation = Literal["identity", "relu", "gelu", "silu"]


def _check(x, index, gate, w_up, w_down, activation, index_bound) -> None:
    for name, t in (("x", x), ("index", index), ("gate", gate), ("w_up", w_up), ("w_down", w_down)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if activation not in ACTIVATION_NAMES:
        raise ValueError(f"activation must be one of {ACTIVATION_NAMES}, got {activation!r}")
    _check_routing(x, index, gate)
    e = _check_weights(x, w_up, w_down)
    check_one_device("moe_mlp", x, index, gate, w_up, w_down)
    check_index_range("moe_mlp", index, e, index_bound)


def _check_routing(x: torch.Tensor, index: torch.Tensor, gate: torch.Tensor) -> None:
    """Shapes and dtypes of ``index`` and ``gate`` against ``x``."""
    if x.dim() < 1:
        raise ValueError("x must have shape [..., d], got a scalar")
    if index.dim() < 1 or index.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"index must have shape [*x.shape[:-1], k] = [{', '.join(map(str, x.shape[:-1]))}, k],"
            f" got {list(index.shape)}"
        )
    check_routing_tensors(index, gate)


def _check_weights(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> int:
    """Shapes and dtypes of the weights against each other and ``x``; returns the number of
    experts."""
    if w_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError(
            f"w_up and w_down must be [E, d, H] and [E, H, d_out], got {list(w_up.shape)} and "
            f"{list(w_down.shape)}"
        )
    e, d, hid = w_up.shape
    if w_down.shape[0] != e or w_down.shape[1] != hid:
        raise ValueError(
            f"w_down must have shape [{e}, {hid}, d_out] to match w_up {list(w_up.shape)}, got "
            f"{list(w_down.shape)}"
        )
    if x.shape[-1] != d:
        raise ValueError(f"x has width {x.shape[-1]} but w_up expects {d}")
    if not (x.dtype.is_floating_point and w_up.dtype.is_floating_point):
        raise TypeError(f"x and the weights must be floating point, got {x.dtype}, {w_up.dtype}")
    if w_up.dtype != w_down.dtype:
        raise TypeError(f"w_up ({w_up.dtype}) and w_down ({w_down.dtype}) must share a dtype")
    return e


def moe_mlp(
    x: torch.Tensor,
    index: torch.Tensor,
    gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: Activation = "relu",
    deterministic: bool = True,
    *,
    index_bound: int | None = None,
    backend: Backend | None = None,
    block_m: int | None = None,
    gemm_configs: Mapping[str, Sequence[int]] | None = None,
    weight_grads_in_compute_dtype: bool = False,
    _backward_overlap: bool | None = None,
) -> torch.Tensor:
    """The sigma-MoE feedforward: ``out = sum_j gate[..., j] * act(x @ w_up[e_j]) @ w_down[e_j]``
    with ``e_j = index[..., j]``.

    Args:
        x: ``[..., d]`` input rows.
        index: ``[..., k]`` integer expert indices (the leading dims are ``x``'s).
        gate: ``[..., k]`` the weight of each selected expert (differentiable).
        w_up: ``[E, d, H]`` and ``w_down``: ``[E, H, d_out]``, the experts' two matrices.
        activation: ``"relu"`` (default), ``"gelu"`` (exact, erf), ``"silu"`` or ``"identity"``.
        deterministic: ``True`` (default) sums each token's k expert outputs (and input
            gradients) in a fixed order: bitwise reproducible. ``False`` adds them with fp32
            atomics on the Triton path, which skips writing the per-slot products.
        index_bound: a promise that ``0 <= index < index_bound`` holds (e.g. the indices of a
            top-k over ``index_bound`` scores): no read-back of the indices, so no host sync,
            and the call can be captured in a CUDA graph. Without it the range is checked.
        backend: ``"reference"`` (PyTorch, any device) or ``"triton"``; by default Triton on
            CUDA and the reference elsewhere.
        block_m: the Triton kernels' tile height (rows of one expert per tile, a power of two
            >= 16) for this call; by default ``moe_ops.BLOCK_M`` (16 under the interpreter).
        gemm_configs: launch settings of this call's Triton kernels (forward and backward) by
            role, replacing those of ``moe_ops.GEMM_CONFIGS`` (its keys, its tuples' forms:
            e.g. ``{"up": (BLOCK_N, BLOCK_K, num_warps, num_stages)}``); roles left out keep
            theirs. Blocks powers of two >= 16, warps a power of two up to 32. For tuning sweeps
            (``benchmarks/sweep_linear.py``, ``ab_moe_variants.py``); the result does not depend
            on ``block_m`` or ``gemm_configs`` beyond rounding, and the reference ignores them.
            A bad value raises ``ValueError`` before anything runs.
        weight_grads_in_compute_dtype: round this call's weight gradients to the compute dtype
            (``x``'s, the autocast dtype under autocast) before they reach autograd in the
            weights' dtype, as autocast's matmuls do. For weights applied several times in a
            ``torch.compile``'d step (MoEUT's shared layers): the compiled graph sums the uses'
            gradients in one kernel, which then reads half the bytes, and each use's
            weight-gradient GEMM writes half. Inside :func:`accumulate_weight_grads` (eager)
            the kernels sum the uses in the weights' dtype and this is not used.
        _backward_overlap: private, for ``benchmarks/ab_moe_variants.py``: whether the backward
            computes the input gradient on a side stream (default ``moe_ops.BACKWARD_SCHEDULE``).

    Returns:
        ``[..., d_out]`` in ``x``'s dtype (the autocast dtype under autocast, where fp32 weights
        are cast once per weight version, not per call). Gradients flow to ``x``, ``gate``,
        ``w_up`` and ``w_down`` (weight gradients in the weights' dtype).
    """
    block_m = check_block_m(block_m)  # host checks first: _check may read the indices back
    configs = check_gemm_configs(gemm_configs)
    rounded = check_weight_grad_rounding(weight_grads_in_compute_dtype)
    if _backward_overlap is not None and not isinstance(_backward_overlap, bool):
        raise TypeError(f"_backward_overlap must be a bool or None, got {_backward_overlap!r}")
    _check(x, index, gate, w_up, w_down, activation, index_bound)
    x, chosen = compute_dtype_and_backend(x, w_up.dtype, backend)
    lead, top_k = x.shape[:-1], index.shape[-1]
    block_m = block_m_for(chosen) if block_m is None else block_m
    flat_index = index.reshape(-1).long()
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    flat_gate = gate.reshape(-1).contiguous()
    n_experts = w_up.shape[0]
    settings = (top_k, block_m, activation, deterministic, chosen)
    grad_dtype = weight_grad_dtype(rounded, x.dtype, w_up.dtype)
    with autocast_off(x.device.type):
        if torch.compiler.is_compiling():  # ops with fake implementations (traced_ops.pick)
            routing = pick(moe_routing, moe_routing_traced, chosen)(
                flat_index, n_experts, block_m, chosen
            )
            launch = (encode_gemm_configs(configs), _backward_overlap, grad_dtype)
            forward = pick(moe_mlp_forward, moe_mlp_forward_traced, chosen)
            out = forward(x2, flat_gate, w_up, w_down, *routing, *settings, *launch)[0]
        else:  # the same implementations with less host time per call
            (w_up, up_shared), (w_down, down_shared) = shared_use(w_up), shared_use(w_down)
            out = MoEMLPFunction.apply(
                x2, flat_gate, w_up, w_down, flat_index, n_experts, *settings,
                (up_shared, down_shared), configs, _backward_overlap, grad_dtype,
            )  # fmt: skip
    return out.view(*lead, w_down.shape[2])
