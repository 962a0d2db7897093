"""Input checks shared by every CVMM path, run in Python before any kernel launches."""

from __future__ import annotations

import torch

from .selection import CVMMSel


def check_cvmm_inputs(x: torch.Tensor, sel: CVMMSel, weights: torch.Tensor) -> None:
    """Raise a clear error for inputs that no path can multiply correctly.

    Checks dtypes, ranks, matching ``d_in``, devices, the sizes of the index tensors, and the
    range of every index (this reads two scalars back from the device).
    """
    if not isinstance(x, torch.Tensor) or not isinstance(weights, torch.Tensor):
        raise TypeError("cvmm expects tensors for x and weights")
    if not x.dtype.is_floating_point or not weights.dtype.is_floating_point:
        raise TypeError(f"cvmm needs floating-point x and weights, got {x.dtype}, {weights.dtype}")
    if weights.dim() != 3:
        raise ValueError(
            f"weights must be [n_matrices, d_in, d_out], got shape {tuple(weights.shape)}"
        )
    if x.dim() < 1 or x.shape[-1] != weights.shape[1]:
        raise ValueError(
            f"x's last dim ({x.shape[-1] if x.dim() else None}) must equal d_in of the weights "
            f"({weights.shape[1]})"
        )
    tensors = {"x": x, "weights": weights, "sel": sel.sel, "sel_index": sel.sel_index}
    if sel.out_index is not None:
        tensors["out_index"] = sel.out_index
    if sel.reduction_weight is not None:
        tensors["reduction_weight"] = sel.reduction_weight
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"cvmm inputs must be on one device, got {devices}")
    for name in ("sel", "sel_index", "out_index"):
        t = tensors.get(name)
        if t is not None and (t.dtype.is_floating_point or t.dtype == torch.bool):
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    n = sel.sel.numel()
    if sel.sel_index.numel() != n or (sel.out_index is not None and sel.out_index.numel() != n):
        raise ValueError(
            f"sel_index/out_index must have one entry per selection ({n}), got "
            f"{sel.sel_index.numel()} and "
            f"{None if sel.out_index is None else sel.out_index.numel()}"
        )
    w = sel.reduction_weight
    if w is not None:
        if w.numel() != n or w.dim() < 1:
            raise ValueError(
                f"reduction_weight must have one entry per selection ({n}), "
                f"got shape {tuple(w.shape)}"
            )
        if not w.dtype.is_floating_point:
            raise TypeError(f"reduction_weight must be floating point, got {w.dtype}")
    if n == 0:
        return
    if torch.compiler.is_compiling():
        return  # the range checks read values back from the device: not inside a graph
    n_rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    n_out = n
    _check_range("expert index (sel)", sel.sel, weights.shape[0])
    _check_range("input row index (sel_index)", sel.sel_index, n_rows)
    if sel.out_index is not None:
        _check_range("output row index (out_index)", sel.out_index, n_out)
    elif n_rows != n:
        raise ValueError(
            f"without out_index, x must have one row per selection ({n}), got {n_rows} rows"
        )


def _check_range(what: str, index: torch.Tensor, size: int) -> None:
    lo, hi = torch.aminmax(index.flatten())
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= size:
        raise IndexError(f"{what} out of range: values in [{lo}, {hi}], valid range [0, {size})")
