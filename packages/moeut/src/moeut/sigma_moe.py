"""sigma-MoE feedforward: top-k of sigmoid-scored experts, each a small two-layer MLP."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from cvmm_kernel import cvmm, cvmm_prepare_sel2, moe_mlp, sigmoid_topk
from cvmm_kernel.shared_grads import matmul_f32
from cvmm_kernel.weight_cache import cast_weight
from switchhead.inputs import check_layer_inputs
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from cvmm_kernel.moe_mlp import Activation

# Activations the fused kernels apply themselves; any other callable runs between two cvmm calls.
FUSED_ACTIVATIONS: dict[Callable, Activation] = {
    F.relu: "relu",
    torch.relu: "relu",
    F.gelu: "gelu",
    F.silu: "silu",
}


def selection_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [..., d] @ weight[E, d]^T`` -> ``[..., E]`` (in autocast's dtype under autocast, as
    ``F.linear``), computed with ``E`` padded to a multiple of 8 with zero rows: cuBLAS has no
    fast kernel for 16-bit rows of odd width (387 experts took ~0.3 ms per layer on an H100
    instead of ~0.01, benchmarks/results/profile_MoEUT_244M.txt). A strided view of the padded
    result. The padded weight in the compute dtype is made once per weight version (MoEUT applies
    a shared layer several times per step) and the weight's gradient is written in float32 by the
    GEMM itself: one GEMM forward and two backward, instead of a pad, a cast and the GEMM
    forward and a slice's, a cast's and a pad's backward around two GEMMs (host time of the
    eager step, benchmarks/results/host_sampling.txt). Compiled: the plain expression, which
    Inductor fuses."""
    if torch.compiler.is_compiling():
        return _padded_linear(x, weight)
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    flat, pad = x.reshape(-1, x.shape[-1]), -weight.shape[0] % 8
    return _SelectionLogits.apply(flat, weight, dtype, pad).view(*x.shape[:-1], weight.shape[0])


def _padded_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`selection_logits` as plain PyTorch ops (the padding and cast at every call)."""
    pad = -weight.shape[0] % 8
    if pad == 0:
        return F.linear(x, weight)
    return F.linear(x, F.pad(weight, (0, 0, 0, pad)))[..., : weight.shape[0]]


class _SelectionLogits(torch.autograd.Function):
    """``x [N, d] @ weight[E, d]^T`` in ``dtype`` through the weight's zero-padded copy."""

    @staticmethod
    def forward(ctx, x, weight, dtype, pad):
        padded = cast_weight(weight, dtype, pad_rows=pad)
        x = x.to(dtype)
        ctx.save_for_backward(x, weight)
        ctx.dtype, ctx.pad = dtype, pad
        return torch.mm(x, padded.t())[:, : weight.shape[0]]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = F.pad(grad.to(ctx.dtype), (0, ctx.pad))  # [N, E + pad]: aligned rows
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = grad @ cast_weight(weight, ctx.dtype, pad_rows=ctx.pad)
        if ctx.needs_input_grad[1]:
            # 16-bit operands: a float32 result from the GEMM itself (no cast after it)
            low = x.dtype in (torch.bfloat16, torch.float16)
            dw = (matmul_f32(grad.t(), x) if low else grad.t() @ x)[: weight.shape[0]]
            dw = dw.to(weight.dtype)
        return dx, dw, None, None


class SigmaMoE(torch.nn.Module):
    """``out = sum_{e in topk(s)} sigmoid(s_e) * act(x @ keys[e]) @ values[e]``.

    The scores are ``s = sel_input @ expert_sel^T``.

    Args:
        d_model: input width; ``v_dim`` output width (default ``d_model``).
        n_experts, expert_size, k: experts, hidden size of each, experts per token.
        activation: applied between the projections (default ReLU).
        expert_dropout: probability of hiding an expert from the top-k choice in training.

    Set ``record_selection_logits = True`` to keep the raw logits ``[..., n_experts]`` of the last
    forward in ``last_selection_logits`` (for the entropy regulariser), and
    ``record_selection_index = True`` to keep the experts each training forward chose (after
    expert dropout) in ``last_selection_index`` (``[..., k]`` int64; for usage statistics).
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
        if d_model < 1 or expert_size < 1 or (v_dim is not None and v_dim < 1):
            raise ValueError(
                f"d_model, expert_size and v_dim must be >= 1, got {d_model}, {expert_size}, "
                f"{v_dim}"
            )
        if not 1 <= k <= n_experts:
            raise ValueError(f"k must be in [1, n_experts={n_experts}], got {k}")
        if not 0.0 <= expert_dropout < 1.0:
            raise ValueError(f"expert_dropout must be in [0, 1), got {expert_dropout}")
        self.k_dim = d_model
        self.v_dim = v_dim if v_dim is not None else d_model
        self.n_experts = n_experts
        self.expert_size = expert_size
        self.n_heads = k
        self.activation = activation
        self.expert_dropout = expert_dropout
        self.record_selection_logits = False
        # False: the k expert outputs of a token are added with fp32 atomics (faster on some
        # shapes, not bitwise reproducible); see cvmm_kernel.moe_mlp.
        self.deterministic = True
        # True: each call's expert-weight gradients are rounded to the compute dtype before
        # autograd sums them (cvmm_kernel.moe_mlp's weight_grads_in_compute_dtype); MoEUT sets it
        # on layers applied several times per step.
        self.weight_grads_in_compute_dtype = False
        self.last_selection_logits: torch.Tensor | None = None
        self.record_selection_index = False
        self.last_selection_index: torch.Tensor | None = None
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
        (default ``input``), which must have ``input``'s shape: row ``i`` of ``sel_input``
        chooses the experts of row ``i`` of ``input``.

        Inputs are floating point, on the parameters' device, with the parameters' dtype outside
        autocast; any strides. Empty inputs give empty outputs.

        Raises:
            TypeError, ValueError: for other inputs, before any computation.
        """
        self._check_inputs(input, sel_input)
        logits = selection_logits(input if sel_input is None else sel_input, self.expert_sel)
        self.last_selection_logits = logits if self.record_selection_logits else None
        hidden = None
        if self.training and self.expert_dropout > 0:
            hidden = torch.rand_like(logits) < self.expert_dropout
        # the k largest logits (hidden experts last) and their sigmoid: one kernel on CUDA
        index, gate = sigmoid_topk(logits, self.n_heads, drop=hidden)
        recording = self.record_selection_index and self.training
        self.last_selection_index = index if recording else None
        fused = FUSED_ACTIVATIONS.get(self.activation)
        if fused is not None:  # one fused op: routing once, activation and gates in the kernels
            return moe_mlp(
                input, index, gate, self.keys, self.values, fused, self.deterministic,
                index_bound=self.n_experts,  # top-k indices: in range by construction, no sync
                weight_grads_in_compute_dtype=self.weight_grads_in_compute_dtype,
            )  # fmt: skip
        sel = cvmm_prepare_sel2(index, index_bound=self.n_experts)  # top-k: in range, no sync
        hidden = self.activation(cvmm(input, sel, self.keys))  # [..., k, expert_size]
        down = sel.with_input_rows_per_group(1)
        down.reduction_weight = gate
        return cvmm(hidden, down, self.values)

    def _check_inputs(self, input: torch.Tensor, sel_input: torch.Tensor | None) -> None:
        tensors = (
            {"input": input} if sel_input is None else {"input": input, "sel_input": sel_input}
        )
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if input.dim() < 1 or input.shape[-1] != self.k_dim:
            raise ValueError(f"input must be [..., d_model={self.k_dim}], got {tuple(input.shape)}")
        if sel_input is not None and sel_input.shape != input.shape:
            # The authors' code takes any sel_input with as many rows and then mixes up which
            # row's experts compute which row.
            raise ValueError(
                f"sel_input must have input's shape {tuple(input.shape)} (row i chooses the "
                f"experts of row i), got {tuple(sel_input.shape)}"
            )
        check_layer_inputs(tensors, self.expert_sel, "SigmaMoE inputs")
