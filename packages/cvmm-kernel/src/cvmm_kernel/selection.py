"""Which matrix each row uses: the sorted selection that every CVMM path consumes.

A selection maps *sorted positions* ``p = 0..N-1`` (N = number of (row, expert) pairs) to

- ``sel[p]``: the expert (matrix) index, sorted ascending over ``p``,
- ``sel_index[p]``: the input row of ``x`` (flattened over its leading dims),
- ``out_index[p]``: the output row the product is written to (``None`` means ``sel_index[p]``),

plus an optional ``reduction_weight`` that sums the k products of each output group with weights.
The field names and meanings are those of sigma-MoE's ``CVMMSel``, so code written against it
works unchanged (SwitchHead, for example, rewrites ``sel_index`` and ``reduction_weight`` of a
selection to project per-head rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CVMMSel:
    """A prepared expert selection (see the module docstring for the meaning of each field).

    Attributes:
        raw_sel: the expert indices as given, any shape ``[*S]``.
        sel: the same indices sorted ascending, shape ``[*S]``.
        sel_index: input row for each sorted position, shape ``[N]`` with ``N = prod(S)``.
        out_index: output row for each sorted position, shape ``[N]``, or ``None`` for
            ``sel_index``.
        reduction_weight: optional weights ``[*W]`` with ``prod(W) == N``; the output is then
            ``[*W[:-1], d_out]``, the weighted sum over the last dim of groups of ``W[-1]``
            consecutive output rows.
    """

    raw_sel: torch.Tensor
    sel: torch.Tensor
    sel_index: torch.Tensor
    out_index: torch.Tensor | None = None
    reduction_weight: torch.Tensor | None = None
    # Set by the constructors: g > 0 when the index layout is known by construction to be
    # "sorted experts, input row = output row // g, output rows a permutation". Reassigning
    # sel, sel_index or out_index clears it, so hand-made layouts get the full validation.
    layout_group: int = field(default=0, repr=False, compare=False)
    # Set by the constructors when the caller guarantees 0 <= sel < index_bound (indices from a
    # top-k over index_bound experts): cvmm then checks the range on the host, without reading
    # the indices back from the device. Cleared with layout_group.
    index_bound: int | None = field(default=None, repr=False, compare=False)

    def __setattr__(self, name: str, value) -> None:
        if name in ("sel", "sel_index", "out_index") and "layout_group" in self.__dict__:
            object.__setattr__(self, "layout_group", 0)
            object.__setattr__(self, "index_bound", None)
        object.__setattr__(self, name, value)

    def clone(self) -> CVMMSel:
        """A shallow copy (the tensors are shared), as sigma-MoE's ``CVMMSel.clone``."""
        copy = CVMMSel(
            self.raw_sel, self.sel, self.sel_index, self.out_index, self.reduction_weight
        )
        copy.layout_group, copy.index_bound = self.layout_group, self.index_bound
        return copy

    def with_input_rows_per_group(self, group: int) -> CVMMSel:
        """A copy whose input row is ``output row // group`` (rows of ``x`` are groups of
        ``group`` outputs, e.g. SwitchHead's per-head output projection); the layout stays
        known, so ``cvmm`` needs no index validation beyond the expert range."""
        if self.out_index is None:
            raise ValueError("with_input_rows_per_group needs a selection with out_index")
        copy = CVMMSel(self.raw_sel, self.sel, self.out_index // group, self.out_index)
        copy.reduction_weight = self.reduction_weight
        copy.layout_group = group if self.layout_group else 0
        copy.index_bound = self.index_bound if self.layout_group else None
        return copy


def _check_index_tensor(sel: torch.Tensor) -> None:
    if not isinstance(sel, torch.Tensor):
        raise TypeError(f"expert indices must be a tensor, got {type(sel).__name__}")
    if sel.dtype.is_floating_point or sel.dtype.is_complex or sel.dtype == torch.bool:
        raise TypeError(f"expert indices must be an integer tensor, got {sel.dtype}")


def cvmm_prepare_sel(sel: torch.Tensor, n_experts: int | None = None) -> CVMMSel:
    """One matrix per row: row ``i`` of ``x`` (flattened) is multiplied by ``W[sel.flatten()[i]]``.

    Args:
        sel: integer expert indices, any shape ``[*S]``; ``x`` must have ``prod(S)`` rows.
        n_experts: accepted for compatibility with sigma-MoE; the range is checked by ``cvmm``.

    Returns:
        A :class:`CVMMSel`; ``cvmm`` with it returns ``[*S, d_out]``.
    """
    _check_index_tensor(sel)
    sorted_sel, order = sel.flatten().sort()
    return CVMMSel(raw_sel=sel, sel=sorted_sel.view_as(sel), sel_index=order, layout_group=1)


def cvmm_prepare_sel2(
    sel: torch.Tensor, w: torch.Tensor | None = None, *, index_bound: int | None = None
) -> CVMMSel:
    """k matrices per row: ``sel[..., j]`` is the j-th expert of input row ``...``.

    Args:
        sel: integer expert indices ``[*B, k]``; ``x`` has ``prod(B)`` rows.
        w: optional reduction weights ``[*B, k]`` (or any shape with ``prod == sel.numel()``):
            the output is then ``sum_j w[..., j] * x[...] @ W[sel[..., j]]``, shape ``[*B, d_out]``.
        index_bound: a promise that ``0 <= sel < index_bound`` holds by construction (e.g. the
            indices of a ``topk`` over ``index_bound`` scores). ``cvmm`` then checks only
            ``index_bound <= n_matrices``, on the host: no read-back of the indices, so no
            host-device synchronisation. Without it, ``cvmm`` reads the index range back.

    Returns:
        A :class:`CVMMSel` with input row ``= sorted position // k`` and output row ``= sorted
        position``; without ``w``, ``cvmm`` returns ``[*B, k, d_out]``.
    """
    _check_index_tensor(sel)
    if sel.dim() == 0:
        raise ValueError("cvmm_prepare_sel2 needs indices of shape [..., k], got a scalar")
    k = sel.shape[-1]
    sorted_sel, order = sel.flatten().sort()
    in_index = order // k if k > 0 else order
    return CVMMSel(
        raw_sel=sel,
        sel=sorted_sel.view_as(sel),
        sel_index=in_index,
        out_index=order,
        reduction_weight=w,
        layout_group=k,
        index_bound=index_bound,
    )


# Clearer names for the same two constructors.
select_one_expert_per_row = cvmm_prepare_sel
select_k_experts_per_row = cvmm_prepare_sel2
