"""The public ``cvmm`` entry point: validation, then dispatch to a backend."""

from __future__ import annotations

from typing import Literal

import torch

from .reference import cvmm_reference
from .selection import CVMMSel, cvmm_prepare_sel
from .validation import check_cvmm_inputs

Backend = Literal["reference", "triton"]


def cvmm(
    x: torch.Tensor,
    sel: torch.Tensor | CVMMSel,
    weights: torch.Tensor,
    *,
    backend: Backend | None = None,
) -> torch.Tensor:
    """Per-row expert matrix multiply: ``out[i] = x[row(i)] @ weights[sel[i]]``.

    Args:
        x: ``[..., d_in]`` input rows.
        sel: raw integer indices (one matrix per row of ``x``; same number of elements as ``x``
            has rows) or a :class:`CVMMSel` from ``cvmm_prepare_sel``/``cvmm_prepare_sel2``.
        weights: ``[n_matrices, d_in, d_out]``.
        backend: ``"reference"`` (PyTorch, any device) or ``"triton"``; default by device.

    Returns:
        ``[*sel.shape, d_out]``, or ``[*reduction_weight.shape[:-1], d_out]`` when the selection
        carries a reduction weight.
    """
    if not isinstance(sel, CVMMSel):
        sel = cvmm_prepare_sel(sel, weights.shape[0] if weights.dim() == 3 else None)
    check_cvmm_inputs(x, sel, weights)
    if backend not in (None, "reference", "triton"):
        raise ValueError(f"unknown cvmm backend {backend!r}; use 'reference' or 'triton'")
    if backend == "triton":
        raise NotImplementedError("the Triton backend of cvmm is not available yet")
    return cvmm_reference(x, sel, weights)
