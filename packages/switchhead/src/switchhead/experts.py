"""SwitchHead's expert projections: two interchangeable paths behind one small interface.

Each head ``h`` owns ``E`` value matrices (rows ``h * E + e`` of ``v``) and ``E`` output matrices
(rows of ``o``); per token the ``moe_k`` experts with the largest sigmoid scores are chosen per
head (ties to the lower index; with ``expert_dropout`` in training, dropped experts rank last).

- :class:`DenseGatedExperts` (``expert_impl="dense"``): every expert's projection as one dense
  matmul, the unchosen ones weighted by 0: the same function and gradients at ``E / moe_k``
  times the expert FLOPs, in large cuBLAS matmuls (the value experts ride in the layer's fused
  input projection, or have one of their own under ``torch.compile``); the choice is
  ``sigmoid_topk``'s and the gated mixing one Triton pass each way
  (:mod:`switchhead.expert_mix`).
- :class:`SparseExperts` (``expert_impl="cvmm"``): only the chosen experts, through
  ``cvmm_kernel.moe_linear`` (gathered grouped GEMMs sorted by expert on CUDA, no host sync).

A path is stateless; the layer (:class:`switchhead.attention.SwitchHeadCore`) passes itself
for its sizes, weights and training flags.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from cvmm_kernel import moe_linear, sigmoid_topk

from .expert_mix import mix_experts, spread_experts

if TYPE_CHECKING:
    from .attention import SwitchHeadCore


def _dropped(core: SwitchHeadCore, logits: torch.Tensor) -> torch.Tensor | None:
    """The experts hidden from the choice under expert dropout in training (else None)."""
    if core.expert_dropout > 0 and core.training:
        return torch.rand_like(logits) < core.expert_dropout
    return None


def _all_chosen(core: SwitchHeadCore) -> bool:
    return core.moe_k == core.n_experts and not (core.expert_dropout > 0 and core.training)


def dense_gates(core: SwitchHeadCore, logits: torch.Tensor, key: str | None = None) -> torch.Tensor:
    """``logits [..., H, E]`` -> gates ``[..., H, E]``: the score of chosen experts, else 0.

    The choice is :func:`chosen_experts`': the ``moe_k`` largest logits (dropped experts last,
    the lower index among equals). The dense path's formulation for ``torch.compile``: ranking
    by pairwise comparison and weighting with plain multiplies, which Inductor fuses (in eager
    mode :mod:`switchhead.expert_mix`'s kernels do better). ``key`` (``"v"``/``"o"``): where the
    layer records its choice (see ``record_selection_index``).
    """
    scores = logits.sigmoid()
    recording = key is not None and core.last_selection_index is not None
    if _all_chosen(core):
        if recording:
            every = torch.arange(core.n_experts, device=logits.device).expand_as(scores)
            _record(core, key, _head_offsets(core, every))
        return scores
    ranked = logits.detach()
    drop = _dropped(core, logits)
    if drop is not None:
        ranked = ranked.masked_fill(drop, float("-inf"))
    e = core.n_experts
    earlier = torch.ones(e, e, dtype=torch.bool, device=scores.device).tril(-1)
    a, b = ranked.unsqueeze(-1), ranked.unsqueeze(-2)  # a: expert i, b: expert j
    beaten_by = (b > a) | ((b == a) & earlier)  # [..., i, j]: j ranks before i
    rank = beaten_by.sum(-1)  # a permutation of 0..E-1 per row
    if recording:
        _record(core, key, _head_offsets(core, rank.argsort(-1)[..., : core.moe_k]))
    return scores * (rank < core.moe_k)


def _head_offsets(core: SwitchHeadCore, index: torch.Tensor) -> torch.Tensor:
    """Expert numbers ``[..., H, k]`` of each head -> ``head * E + expert``."""
    e = core.n_experts
    return index + torch.arange(0, core.n_heads * e, e, device=index.device).unsqueeze(-1)


def _record(core: SwitchHeadCore, key: str | None, index: torch.Tensor) -> None:
    """Keep the chosen experts of ``key`` where the layer records them (training forwards with
    ``record_selection_index``)."""
    if key is not None and core.last_selection_index is not None:
        core.last_selection_index[key] = index.detach()


def chosen_experts(
    core: SwitchHeadCore, logits: torch.Tensor, *, global_index: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits [..., H, E]`` -> ``(index, gate)`` ``[..., H, moe_k]``: the chosen experts of
    every head and their sigmoid scores. ``index`` numbers them as rows of ``v``/``o`` (``head *
    E + expert``), or within the head with ``global_index=False``."""
    if _all_chosen(core):
        scores = logits.sigmoid()
        index = torch.arange(core.n_experts, device=logits.device).expand_as(scores)
        return (_head_offsets(core, index) if global_index else index), scores
    # one kernel each way on CUDA; the largest logits, ties to the lower index
    return sigmoid_topk(logits, core.moe_k, drop=_dropped(core, logits), global_index=global_index)


class ExpertPath:
    """How a layer computes its value and output experts.

    ``fuses_values``: the value experts of every head are columns of the layer's fused input
    projection (``v_all [B, Tk, H, E, hs]`` reaches :meth:`values`); otherwise ``v_all`` is
    ``None`` and :meth:`values` projects ``v_src`` itself.
    """

    fuses_values: ClassVar[bool]

    def values(
        self, core: SwitchHeadCore, v_src: torch.Tensor, v_all: torch.Tensor | None, logits
    ) -> torch.Tensor:
        """Values ``[B, Tk, H, head_size]`` from ``v_src [B, Tk, d_model]`` (or ``v_all``) and
        the value selection ``logits [B, Tk, H, E]``."""
        raise NotImplementedError

    def output(self, core: SwitchHeadCore, res: torch.Tensor, logits) -> torch.Tensor:
        """``res [B, Tq, H, head_size]`` -> ``[B, Tq, d_model]`` through the chosen output
        experts of each head (selection ``logits [B, Tq, H, E]``), summed over heads."""
        raise NotImplementedError


class DenseGatedExperts(ExpertPath):
    fuses_values = True

    def values(self, core, v_src, v_all, logits):
        assert v_all is not None  # fuses_values: the input projection computed every expert
        if torch.compiler.is_compiling():
            gates = dense_gates(core, logits, "v").to(v_all.dtype)
            return (v_all * gates.unsqueeze(-1)).sum(-2)
        index, gate = self._choose(core, logits, "v")
        return mix_experts(v_all, index, gate)

    def output(self, core, res, logits):
        if torch.compiler.is_compiling():
            gates = dense_gates(core, logits, "o").to(res.dtype)  # [B, Tq, H, E]
            mixed = res.unsqueeze(-2) * gates.unsqueeze(-1)  # [B, Tq, H, E, hs]
        else:
            index, gate = self._choose(core, logits, "o")
            mixed = spread_experts(res, index, gate, core.n_experts)
        return torch.matmul(mixed.flatten(-3), core._o_cols())

    @staticmethod
    def _choose(core, logits, key):
        """Experts numbered within their head (the slots of ``v_all`` and of the spread)."""
        index, gate = chosen_experts(core, logits, global_index=False)
        if core.last_selection_index is not None:
            _record(core, key, _head_offsets(core, index))
        return index, gate


class SparseExperts(ExpertPath):
    fuses_values = False

    def values(self, core, v_src, v_all, logits):
        index, gate = chosen_experts(core, logits)
        _record(core, "v", index)
        # top-k indices are in range by construction: index_bound skips reading them back
        rounded = core.weight_grads_in_compute_dtype
        v = moe_linear(v_src, index, gate, core.v, index_bound=core.v.shape[0],
                       weight_grads_in_compute_dtype=rounded)  # fmt: skip
        pad = core.head_size - core.projection_size
        return F.pad(v, (0, pad)) if pad else v

    def output(self, core, res, logits):
        index, gate = chosen_experts(core, logits)
        _record(core, "o", index)
        rows = res[..., : core.projection_size]  # each head's row through its experts, summed
        return moe_linear(
            rows, index, gate, core.o, reduce_groups=True, index_bound=core.o.shape[0],
            weight_grads_in_compute_dtype=core.weight_grads_in_compute_dtype,
        )  # fmt: skip


EXPERT_PATHS: dict[str, ExpertPath] = {"dense": DenseGatedExperts(), "cvmm": SparseExperts()}
