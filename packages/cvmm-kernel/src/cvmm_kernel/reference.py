"""The reference CVMM in plain PyTorch: differentiable, any device, any float dtype.

This is the CPU path for users and the oracle of the tests. It gathers the selected input rows,
multiplies each run of rows that share an expert by that expert's matrix (one ``mm`` per expert
that has rows), scatters the products to their output rows and applies the optional weighted
reduction. Gradients for ``x``, ``weights`` and ``reduction_weight`` come from autograd.
"""

from __future__ import annotations

import torch

from .selection import CVMMSel


def cvmm_reference(x: torch.Tensor, sel: CVMMSel, weights: torch.Tensor) -> torch.Tensor:
    """``out[out_index[p]] = x_rows[sel_index[p]] @ weights[sel[p]]``, then the reduction.

    Args:
        x: ``[..., d_in]``; its leading dims are flattened into rows.
        sel: a prepared selection (``sel.sel`` need not be sorted here).
        weights: ``[n_matrices, d_in, d_out]``.

    Returns:
        ``[*sel.sel.shape, d_out]``, or ``[*reduction_weight.shape[:-1], d_out]`` with a
        reduction weight. The dtype is the matmul result dtype of ``x`` and ``weights``
        (autocast applies as for ``torch.mm``).
    """
    d_in, d_out = weights.shape[1], weights.shape[2]
    rows = x.reshape(-1, d_in)
    expert = sel.sel.flatten()
    n = expert.numel()
    out_index = sel.sel_index if sel.out_index is None else sel.out_index

    # Group the selections by expert (stable, so equal experts keep their order).
    expert_sorted, order = expert.sort(stable=True)
    gathered = rows[sel.sel_index[order]]
    counts = torch.bincount(expert_sorted, minlength=weights.shape[0]).tolist()
    products = [
        chunk @ weights[e]
        for e, chunk in enumerate(torch.split(gathered, counts))
        if chunk.shape[0] > 0
    ]
    if products:
        out_sorted = torch.cat(products)
    else:  # no selections at all: keep the result dtype a matmul would give
        out_sorted = (rows[:0] @ weights[0]) if weights.shape[0] else rows.new_zeros(0, d_out)
    out = out_sorted.new_zeros(n, d_out).index_copy(0, out_index[order], out_sorted)

    w = sel.reduction_weight
    if w is None:
        return out.view(*sel.sel.shape, d_out)
    grouped = out.view(*w.shape, d_out)
    return (w.unsqueeze(-2).to(grouped.dtype) @ grouped).squeeze(-2)
