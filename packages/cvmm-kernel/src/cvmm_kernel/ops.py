"""The public ``cvmm`` entry point: validation, autocast, dispatch to a backend, reduction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from .autocast_off import autocast_off
from .custom_ops import gather_mm, gather_mm_reduce
from .interpreter import interpreting
from .layout import MAX_EXPERTS_TRITON, expert_bounds
from .selection import CVMMSel, cvmm_prepare_sel
from .validation import CVMM_CONFIG_FIELDS, check_cvmm_inputs, check_launch_config

Backend = Literal["reference", "triton"]


def triton_available() -> bool:
    """Whether the ``triton`` package imports (it is optional off Linux)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(device: torch.device, backend: Backend | None) -> Backend:
    """The backend ``cvmm`` uses for tensors on ``device`` (``None``: by device)."""
    if backend is None:
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if backend == "reference":
        return backend
    if backend != "triton":
        raise ValueError(f"unknown cvmm backend {backend!r}; use 'reference' or 'triton'")
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 "
            "before importing triton to run the kernels on the CPU"
        )
    return backend


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def cvmm(
    x: torch.Tensor,
    sel: torch.Tensor | CVMMSel,
    weights: torch.Tensor,
    *,
    backend: Backend | None = None,
    config: Sequence[int] | None = None,
) -> torch.Tensor:
    """Per-row expert matrix multiply: ``out[i] = x[row(i)] @ weights[sel[i]]``.

    Args:
        x: ``[..., d_in]`` input rows.
        sel: raw integer indices (one matrix per row of ``x``; as many elements as ``x`` has
            rows) or a :class:`CVMMSel` from ``cvmm_prepare_sel``/``cvmm_prepare_sel2``.
        weights: ``[n_matrices, d_in, d_out]``.
        backend: ``"reference"`` (PyTorch, any device) or ``"triton"`` (CUDA, or CPU under
            ``TRITON_INTERPRET=1``); by default Triton on CUDA and the reference elsewhere.
        config: the Triton launch settings ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
            num_stages)`` of every kernel of this call and of its backward (``BLOCK_M``: rows
            per tile, also the rows the weight gradient sums per step; blocks powers of two
            >= 16, warps a power of two up to 32; ``ValueError`` otherwise, before anything
            runs); by default chosen from the sizes. For block-size sweeps
            (``benchmarks/sweep_blocks.py``); the result does not depend on it beyond rounding
            and the reference ignores it.

    Returns:
        ``[*sel.shape, d_out]``, or ``[*reduction_weight.shape[:-1], d_out]`` when the selection
        carries a reduction weight. Under autocast the inputs are cast to the autocast dtype,
        as for a matmul; otherwise ``x`` and ``weights`` must have the same dtype.
    """
    if config is not None:
        config = check_launch_config("config", config, CVMM_CONFIG_FIELDS)
    if not isinstance(sel, CVMMSel):
        sel = cvmm_prepare_sel(sel, weights.shape[0] if weights.dim() == 3 else None)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    backend = resolve_backend(x.device, backend)
    group = check_cvmm_inputs(x, sel, weights, backend=backend)
    if backend == "triton" and weights.shape[0] > MAX_EXPERTS_TRITON:
        raise ValueError(
            f"the Triton backend handles at most {MAX_EXPERTS_TRITON} matrices, got "
            f"{weights.shape[0]}; use backend='reference'"
        )
    cast = _autocast_dtype(x.device)
    if cast is not None:
        # Only x is cast here. The ops cast the weights to x's dtype themselves (a transient
        # copy, in the forward and again in the backward), so autograd saves the original
        # weights and not a low-precision copy per call: a MoEUT-244M step that reuses shared
        # layers 9 times peaks 3.6 GiB lower (moeut/benchmarks/results).
        x = x.to(cast)
    elif x.dtype != weights.dtype:
        raise TypeError(
            f"x ({x.dtype}) and weights ({weights.dtype}) must have the same dtype outside autocast"
        )
    d_in, d_out = weights.shape[1], weights.shape[2]
    n = sel.sel.numel()
    out_row = sel.sel_index if sel.out_index is None else sel.out_index
    expert = sel.sel.flatten()
    bounds = expert_bounds(expert, weights.shape[0])
    w = sel.reduction_weight
    x2 = x.reshape(-1, d_in)
    if w is None:
        products = gather_mm(
            x2, weights, expert, sel.sel_index, out_row, bounds, n, group, backend, config
        )
        return products.view(*sel.sel.shape, d_out)
    n_groups = w.shape[:-1].numel()
    # Autocast would run the reduction in float32; the result keeps the matmul's dtype instead.
    with autocast_off(x.device.type):
        if d_out < d_in:
            # Narrow products (e.g. SwitchHead's value projection): form them, weight them and
            # sum them in fp32; the backward works on [N, d_out], the narrow side. (A bmm of
            # [G, 1, k] @ [G, k, d_out] took ~0.15 ms per call on an H100 for MoEUT-244M's
            # attention, cuBLAS being slow at tiny batched matrices: 11% of the training step,
            # moeut/benchmarks/results/profile_MoEUT_244M.txt.)
            products = gather_mm(
                x2, weights, expert, sel.sel_index, out_row, bounds, n, group, backend, config
            )
            rows = products.view(n_groups, w.shape[-1], d_out)
            weighted = rows * w.reshape(n_groups, w.shape[-1], 1).to(rows.dtype)
            acc = torch.promote_types(rows.dtype, torch.float32)
            out = weighted.sum(1, dtype=acc).to(rows.dtype)
        else:
            # Wide products (down/output projections): the fused op never keeps or
            # back-propagates through [N, d_out]; its backward works on [N, d_in].
            out = gather_mm_reduce(x2, weights, expert, sel.sel_index, out_row, bounds, w,
                                   n_groups, group, backend, config)  # fmt: skip
    return out.view(*w.shape[:-1], d_out)
