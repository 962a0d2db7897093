"""Input checks shared by every CVMM path, run in Python before any kernel launches."""

from __future__ import annotations

import torch

from .selection import CVMMSel


def check_cvmm_inputs(x: torch.Tensor, sel: CVMMSel, weights: torch.Tensor) -> int:
    """Raise a clear error for inputs that no path can multiply correctly.

    Checks dtypes, ranks, matching ``d_in``, devices, the sizes of the index tensors, the range
    of every index, that ``sel`` is sorted and that no output row is written twice. The value
    checks read one small tensor back from the device (a single synchronisation); they are
    skipped while ``torch.compile`` traces.

    Selections made by ``cvmm_prepare_sel``/``cvmm_prepare_sel2`` (and not re-indexed by hand)
    have a known layout: for them only the expert range is read back (two values), or nothing
    at all when the constructor was given ``index_bound``.

    Returns:
        ``g > 0`` when input row ``== output row // g`` for every position (the layout of
        ``cvmm_prepare_sel``/``cvmm_prepare_sel2``, which makes the backward deterministic), else 0.
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
    n_rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if sel.out_index is None and n_rows != n:
        raise ValueError(
            f"without out_index, x must have one row per selection ({n}), got {n_rows} rows"
        )
    if n == 0 or torch.compiler.is_compiling():
        return 0
    if sel.layout_group and n == n_rows * sel.layout_group and sel.index_bound is not None:
        # Range promised by the constructor's caller: a host check, no synchronisation.
        if sel.index_bound > weights.shape[0]:
            raise IndexError(
                f"expert index (sel) out of range: the selection allows indices up to "
                f"{sel.index_bound - 1}, but there are {weights.shape[0]} matrices"
            )
        return sel.layout_group
    if sel.layout_group and n == n_rows * sel.layout_group:
        # Rows, outputs and order are right by construction: only the expert range is open.
        flat = sel.sel.flatten()
        lo, hi = torch.stack([flat[0], flat[-1]]).tolist()
        _check_range("expert index (sel)", lo, hi, weights.shape[0])
        return sel.layout_group
    out_index = sel.sel_index if sel.out_index is None else sel.out_index
    group = n // n_rows if n_rows and n % n_rows == 0 else 0
    stats = [
        sel.sel.min(),
        sel.sel.max(),
        sel.sel_index.min(),
        sel.sel_index.max(),
        out_index.min(),
        out_index.max(),
        torch.bincount(out_index.flatten().clamp(0, n - 1), minlength=n).max(),
        (sel.sel.flatten()[1:] < sel.sel.flatten()[:-1]).any(),
    ]
    if group:
        stats.append((sel.sel_index == out_index // group).all())
    values = torch.stack([s.to(torch.int64) for s in stats]).tolist()
    _check_range("expert index (sel)", values[0], values[1], weights.shape[0])
    _check_range("input row index (sel_index)", values[2], values[3], n_rows)
    _check_range("output row index (out_index)", values[4], values[5], n)
    if values[6] > 1:
        raise ValueError("out_index must not repeat: each output row is written once")
    if values[7]:
        raise ValueError("sel must be sorted ascending (build selections with cvmm_prepare_sel*)")
    return group if group and values[8] else 0


def _check_range(what: str, lo: int, hi: int, size: int) -> None:
    if lo < 0 or hi >= size:
        raise IndexError(f"{what} out of range: values in [{lo}, {hi}], valid range [0, {size})")
