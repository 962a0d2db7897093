"""SwitchHead with Transformer-XL relative positional attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention import AttentionFn, SwitchHeadCore, _autocast_enabled
from .masks import check_mask, sdpa_mask
from .relative_attention import (
    BACKENDS,
    kernel_supports,
    reference_relative_attention,
    relative_attention,
)


class SwitchHeadXL(SwitchHeadCore):
    """SwitchHead with Transformer-XL relative positional attention.

    The score of query ``i`` (absolute position ``offset + i``) and key ``j`` is
    ``(q_i . k_j + q_i . P(j - offset - i)) / sqrt(d_head)`` with ``P`` the projected
    (``pos_to_pk``) sinusoidal embedding of the relative position.

    Two paths compute it (:mod:`switchhead.relative_attention`): flash-style Triton kernels that
    never form a ``[Tq, Tk]`` tensor (``backend="triton"``; memory linear in the length), or the
    positional term as an additive float mask for ``attention_fn`` (``backend="reference"``;
    memory quadratic). ``backend=None`` takes the kernels for CUDA inputs when ``attention_fn``
    is the default and :func:`switchhead.relative_attention.kernel_supports` says so, else the
    reference. A custom ``attention_fn`` always goes through the reference path.

    Args:
        d_model, n_heads, n_experts, dropout, d_head, expert_dropout, moe_k, init_scale,
            attention_fn, expert_impl, pad_head_dim: as :class:`switchhead.SwitchHeadRope`.
        backend: ``None``, ``"reference"`` or ``"triton"`` (see above).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_experts: int,
        dropout: float = 0.0,
        d_head: int | None = None,
        expert_dropout: float = 0.0,
        moe_k: int = 2,
        init_scale: float = 1.0,
        attention_fn: AttentionFn | None = None,
        expert_impl: str = "auto",
        pad_head_dim: bool | None = None,
        backend: str | None = None,
    ):
        super().__init__(
            d_model,
            n_heads,
            n_experts,
            dropout=dropout,
            d_head=d_head,
            expert_dropout=expert_dropout,
            moe_k=moe_k,
            attention_fn=attention_fn,
            expert_impl=expert_impl,
            pad_head_dim=pad_head_dim,
        )
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be None, 'reference' or 'triton', got {backend!r}")
        if backend == "triton" and attention_fn is not None:
            raise ValueError("backend='triton' computes attention itself: leave attention_fn unset")
        self.backend = backend
        self.pe_size = d_model
        self.pos_to_pk = torch.nn.Parameter(torch.empty(n_heads * self.projection_size, d_model))
        self.reset_parameters(init_scale)

    @torch.no_grad()
    def reset_parameters(self, init_scale: float = 1.0) -> None:
        super().reset_parameters(init_scale)
        if hasattr(self, "pos_to_pk"):
            torch.nn.init.normal_(self.pos_to_pk, 0, init_scale / math.sqrt(self.pe_size))

    def _sinusoids(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[P, d_model]``: sin on even channels, cos on odd ones (the authors' layout)."""
        d = self.pe_size
        div = torch.exp(
            torch.arange(0, d, 2, device=positions.device, dtype=dtype) * (-math.log(10000.0) / d)
        )
        angles = positions.to(dtype).unsqueeze(-1) * div
        return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)[:, :d]

    def relative_embeddings(self, n_q: int, n_k: int, offset: int, q: torch.Tensor) -> torch.Tensor:
        """``[H, n_q + n_k - 1, head_size]``: row ``c`` embeds the key-minus-query offset
        ``c - (n_q - 1)`` of queries at ``offset + i`` and keys at ``j``, times the scale."""
        h, hs = self.n_heads, self.head_size
        positions = torch.arange(-(offset + n_q - 1), n_k - offset, device=q.device)
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        pe = self._sinusoids(positions, dtype) * self.scale
        pos_k = self._pad_rows(self.pos_to_pk).view(h, hs, -1)  # [H, hs, d_model]
        return torch.matmul(pos_k, pe.t().to(pos_k.dtype)).transpose(1, 2)

    def _use_kernels(self, q: torch.Tensor) -> bool:
        if self.backend is not None:
            return self.backend == "triton"
        return self.attention_fn is F.scaled_dot_product_attention and kernel_supports(q)

    def attend(self, q, k, v, mask, offset):
        b, h, n_q, _ = q.shape
        n_k = k.shape[-2]
        if n_q == 0:
            return q.new_zeros(b, h, 0, v.shape[-1])
        r = self.relative_embeddings(n_q, n_k, offset, q)
        if self._use_kernels(q):
            # The kernels take one dtype: autocast's where it is on (as SDPA would run).
            dtype = (
                torch.get_autocast_dtype(q.device.type) if _autocast_enabled(q.device) else q.dtype
            )
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            mask = check_mask(mask, b, n_q, n_k, q.device, h)  # (None means causal)
            keep, is_causal = None, mask.causal
            if mask.position_mask is not None or mask.src_length_mask is not None:
                keep, is_causal = sdpa_mask(mask, b, n_q, n_k, q.device, h)
            return relative_attention(q, k, v, r, keep, is_causal, self.scale, backend="triton")
        keep, is_causal = sdpa_mask(mask, b, n_q, n_k, q.device, h)
        return reference_relative_attention(
            q, k, v, r, keep, is_causal, self.scale, self.attention_fn
        )
