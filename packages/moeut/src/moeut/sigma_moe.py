"""sigma-MoE feedforward: top-k of sigmoid-scored experts, each a small two-layer MLP."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from cvmm_kernel import cvmm, cvmm_prepare_sel2


class SigmaMoE(torch.nn.Module):
    """``out = sum_{e in topk(s)} sigmoid(s_e) * act(x @ keys[e]) @ values[e]``.

    The scores are ``s = sel_input @ expert_sel^T``.

    Args:
        d_model: input width; ``v_dim`` output width (default ``d_model``).
        n_experts, expert_size, k: experts, hidden size of each, experts per token.
        activation: applied between the projections (default ReLU).
        expert_dropout: probability of hiding an expert from the top-k choice in training.

    Set ``record_selection_logits = True`` to keep the raw logits ``[..., n_experts]`` of the last
    forward in ``last_selection_logits`` (for the entropy regulariser).
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        expert_size: int,
        k: int,
        activation: Callable[[torch.Tensor], torch.Tensor] = F.relu,
        v_dim: int | None = None,
        expert_dropout: float = 0.0,
    ):
        super().__init__()
        if not 1 <= k <= n_experts:
            raise ValueError(f"k must be in [1, n_experts={n_experts}], got {k}")
        self.k_dim = d_model
        self.v_dim = v_dim if v_dim is not None else d_model
        self.n_experts = n_experts
        self.expert_size = expert_size
        self.n_heads = k
        self.activation = activation
        self.expert_dropout = expert_dropout
        self.record_selection_logits = False
        self.last_selection_logits: torch.Tensor | None = None
        self.keys = torch.nn.Parameter(torch.empty(n_experts, d_model, expert_size))
        self.values = torch.nn.Parameter(torch.empty(n_experts, expert_size, self.v_dim))
        self.expert_sel = torch.nn.Parameter(torch.empty(n_experts, d_model))
        self.reset_parameters(1.0)

    @torch.no_grad()
    def reset_parameters(self, std_scale: float) -> None:
        """The authors' initialisation (selection rows renormalised, overall std kept)."""
        torch.nn.init.normal_(self.expert_sel, 0, std_scale / math.sqrt(self.k_dim))
        torch.nn.init.normal_(self.keys, 0, std_scale / math.sqrt(self.k_dim))
        torch.nn.init.normal_(
            self.values, 0, std_scale / math.sqrt(self.n_experts * self.expert_size)
        )
        std = self.expert_sel.std()
        self.expert_sel.div_(self.expert_sel.norm(dim=1, keepdim=True))
        self.expert_sel.mul_(std / self.expert_sel.std())

    def forward(self, input: torch.Tensor, sel_input: torch.Tensor | None = None) -> torch.Tensor:
        """``input [..., d_model]`` -> ``[..., v_dim]``; experts are chosen from ``sel_input``
        (default ``input``)."""
        logits = F.linear(input if sel_input is None else sel_input, self.expert_sel)
        self.last_selection_logits = logits if self.record_selection_logits else None
        scores = torch.sigmoid(logits)
        ranked = scores
        if self.training and self.expert_dropout > 0:
            hidden = torch.rand_like(scores) < self.expert_dropout
            ranked = scores.masked_fill(hidden, float("-inf"))
        index = ranked.topk(self.n_heads, dim=-1, sorted=False).indices
        gate = scores.gather(-1, index)
        sel = cvmm_prepare_sel2(index, index_bound=self.n_experts)  # top-k: in range, no sync
        hidden = self.activation(cvmm(input, sel, self.keys))  # [..., k, expert_size]
        down = sel.with_input_rows_per_group(1)
        down.reduction_weight = gate
        return cvmm(hidden, down, self.values)
