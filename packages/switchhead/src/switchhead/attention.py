"""SwitchHead attention: value and output projections are mixtures of experts per head.

Each head ``h`` owns ``n_experts`` value matrices ``v[h*E + e]: [d_model, d_head]`` and output
matrices ``o[h*E + e]: [d_head, d_model]``. Per token, sigmoid scores (``sel_v`` from the key
source, ``sel_o`` from the query source) pick the top ``moe_k`` experts of every head; the value
of a head is the score-weighted sum of its chosen experts' projections, and the output is the
score-weighted sum over heads and chosen experts. Queries and keys are plain projections. Both
expert projections run through ``cvmm`` (Triton on CUDA, PyTorch reference elsewhere).

Interface and parameter names are those of the authors' code, so their state_dicts load with
``strict=True``. ``n_experts=1`` is standard attention with a learned sigmoid output gate.

Selection logits: set ``module.record_selection_logits = True`` and every forward stores the raw
(pre-sigmoid, at least float32) selection logits in ``module.last_selection_logits`` as a dict
``{"v": [B, Tk, H, E], "o": [B, Tq, H, E]}`` (``"v"`` absent when ``n_experts == 1``), still
attached to the autograd graph so a regulariser can use them. They are not kept otherwise.

KV cache: pass ``kv_cache={}`` to start caching; ``forward`` returns the new cache, a dict with
``"k"`` and ``"v"`` (``[B, H, T, d_head]``; keys before RoPE). Positions of new tokens continue
from the cache length (RoPE offset, XL relative positions).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from cvmm_kernel import CVMMSel, cvmm, cvmm_prepare_sel2

from .masks import AttentionMask, causal_keep_mask, sdpa_mask
from .rope import RotaryEmbedding

KVCache = dict[str, torch.Tensor] | None
AttentionFn = Callable[..., torch.Tensor]


class SwitchHeadCore(torch.nn.Module):
    """Projections, expert selection and KV cache shared by the RoPE and XL variants."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_experts: int,
        dropout: float = 0.0,
        d_head: int | None = None,
        expert_dropout: float = 0.0,
        moe_k: int = 2,
        attention_fn: AttentionFn | None = None,
    ):
        super().__init__()
        if n_experts < 1 or n_heads < 1:
            raise ValueError(f"n_heads and n_experts must be >= 1, got {n_heads}, {n_experts}")
        if not 1 <= moe_k <= n_experts and n_experts > 1:
            raise ValueError(f"moe_k must be in [1, n_experts={n_experts}], got {moe_k}")
        self.input_size = self.output_size = d_model
        self.n_heads = n_heads
        self.n_experts = n_experts
        self.moe_k = moe_k
        self.expert_dropout = expert_dropout
        self.projection_size = d_head or d_model // n_heads
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.attention_fn = attention_fn or F.scaled_dot_product_attention
        self.record_selection_logits = False
        self.last_selection_logits: dict[str, torch.Tensor] | None = None

        hd = self.projection_size * n_heads
        self.q = torch.nn.Linear(d_model, hd, bias=False)
        self.k = torch.nn.Linear(d_model, hd, bias=False)
        if n_experts > 1:
            self.v = torch.nn.Parameter(
                torch.empty(n_heads * n_experts, d_model, self.projection_size)
            )
            self.o = torch.nn.Parameter(
                torch.empty(n_heads * n_experts, self.projection_size, d_model)
            )
            self.sel_v = torch.nn.Parameter(torch.empty(n_heads * n_experts, d_model))
        else:
            self.v = torch.nn.Parameter(torch.empty(hd, d_model))
            self.o = torch.nn.Parameter(torch.empty(d_model, hd))
        self.sel_o = torch.nn.Parameter(torch.empty(n_heads * n_experts, d_model))
        # q and k are each multiplied by sqrt(scale), then attention runs with scale 1.
        self.qk_scale = (1.0 / math.sqrt(self.projection_size)) ** 0.5

    @torch.no_grad()
    def reset_parameters(self, init_scale: float = 1.0) -> None:
        """The authors' initialisation: normal weights, selection rows renormalised."""
        if self.n_experts > 1:
            torch.nn.init.normal_(self.sel_v, 0, init_scale / math.sqrt(self.input_size))
            _renorm_rows(self.sel_v)
        torch.nn.init.normal_(self.sel_o, 0, init_scale / math.sqrt(self.input_size))
        _renorm_rows(self.sel_o)
        torch.nn.init.normal_(self.k.weight, 0, init_scale / math.sqrt(self.input_size))
        torch.nn.init.normal_(self.q.weight, 0, init_scale / math.sqrt(self.input_size))
        torch.nn.init.normal_(self.v, 0, init_scale / math.sqrt(self.input_size))
        hd = self.n_heads * self.projection_size
        torch.nn.init.normal_(self.o, 0, init_scale / math.sqrt(hd))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, H * d]`` -> ``[B, H, T, d]`` (a view)."""
        return x.view(*x.shape[:-1], self.n_heads, -1).transpose(-2, -3)

    def _select(self, src: torch.Tensor, weight: torch.Tensor) -> tuple[CVMMSel, torch.Tensor]:
        """Top-k experts per head from sigmoid scores; returns the selection and raw logits."""
        logits = F.linear(src, weight)  # scores in at least float32, also under autocast
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        logits = logits.view(*logits.shape[:-1], self.n_heads, self.n_experts)
        scores = logits.sigmoid()
        with torch.no_grad():
            ranked = scores
            if self.expert_dropout > 0 and self.training:
                drop = torch.rand_like(scores) < self.expert_dropout
                ranked = scores.masked_fill(drop, float("-inf"))
            index = ranked.topk(self.moe_k, dim=-1, sorted=False).indices
        gate = torch.gather(scores, -1, index)
        offsets = torch.arange(self.n_heads, device=index.device) * self.n_experts
        index = index + offsets.unsqueeze(-1)
        return cvmm_prepare_sel2(index.flatten(-2, -1), gate), logits

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: AttentionMask | None,
        offset: int,
    ) -> torch.Tensor:
        """Attention core: ``q [B, H, Tq, d]``, ``k, v [B, H, Tk, d]`` -> ``[B, H, Tq, d]``."""
        raise NotImplementedError

    def forward(
        self,
        q_src: torch.Tensor,
        k_src: torch.Tensor,
        v_src: torch.Tensor,
        mask: AttentionMask | None = None,
        kv_cache: KVCache = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Attend from ``q_src [B, Tq, d_model]`` to ``k_src``/``v_src [B, Tk, d_model]``.

        Queries take positions ``cache_length + i``, keys ``j`` (also for cross-attention with
        ``Tq != Tk``).

        Args:
            mask: ``None`` = causal (bottom-right aligned over cache + new keys);
                ``AttentionMask()`` = none; see :class:`AttentionMask`.
            kv_cache: ``None`` (no cache returned), ``{}`` to start one, or a returned cache.

        Returns:
            ``([B, Tq, d_model], cache or None)``.
        """
        if q_src.dim() != 3 or k_src.dim() != 3 or v_src.shape[:-1] != k_src.shape[:-1]:
            raise ValueError(
                "q_src, k_src, v_src must be [B, T, d_model] with equal k/v lengths, got "
                f"{tuple(q_src.shape)}, {tuple(k_src.shape)}, {tuple(v_src.shape)}"
            )
        q = self.q(q_src) * self.qk_scale
        k = self.k(k_src) * self.qk_scale

        logits: dict[str, torch.Tensor] = {}
        if self.n_experts > 1:
            v_sel, logits["v"] = self._select(k_src, self.sel_v)
            o_sel, logits["o"] = self._select(q_src, self.sel_o)
            v = cvmm(v_src, v_sel, self.v).transpose(-2, -3)
        else:
            o_gate = torch.sigmoid(F.linear(q_src, self.sel_o))
            logits["o"] = F.linear(q_src, self.sel_o).unsqueeze(-1)
            v = self._heads(F.linear(v_src, self.v))
        self.last_selection_logits = logits if self.record_selection_logits else None

        q = self._heads(q)
        k = self._heads(k)
        offset = 0
        if kv_cache is not None:
            if "k" in kv_cache:
                offset = kv_cache["k"].shape[-2]
                k = torch.cat([kv_cache["k"], k], dim=-2)
                v = torch.cat([kv_cache["v"], v], dim=-2)
            kv_cache = {"k": k, "v": v}

        q = self.dropout(q)
        res = self.attend(q, k, v, mask, offset).transpose(-2, -3)  # [B, Tq, H, d]

        if self.n_experts > 1:
            # Rows of res are (token, head): output position p reads row p // moe_k, and the
            # reduction sums over heads and chosen experts at once.
            gate = o_sel.reduction_weight
            o_sel = o_sel.with_input_rows_per_group(self.moe_k)
            o_sel.reduction_weight = gate.flatten(-2)
            out = cvmm(res, o_sel, self.o)
        else:
            res = res * o_gate.unsqueeze(-1).type_as(res)
            out = F.linear(res.flatten(-2), self.o)
        return out, kv_cache


def _renorm_rows(x: torch.Tensor) -> None:
    std_rows = x.std(dim=-1, keepdim=True)
    x.div_(x.norm(dim=-1, keepdim=True))
    x.mul_(std_rows / x.std())


class SwitchHeadRope(SwitchHeadCore):
    """SwitchHead with rotary position embedding on ``rotate_fraction`` of each head's channels.

    Args:
        d_model, n_heads, n_experts, dropout, d_head, expert_dropout, moe_k, init_scale: as in
            the authors' code (``d_head`` defaults to ``d_model // n_heads``).
        rotate_fraction: share of channels rotated, rounded down to an even count (any value
            works, including odd head sizes).
        rope_base: RoPE frequency base.
        attention_fn: SDPA-compatible attention core
            ``fn(q, k, v, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0)``.
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
        rotate_fraction: float = 0.5,
        rope_base: float = 10000,
        attention_fn: AttentionFn | None = None,
    ):
        super().__init__(
            d_model, n_heads, n_experts, dropout, d_head, expert_dropout, moe_k, attention_fn
        )
        if not 0.0 <= rotate_fraction <= 1.0:
            raise ValueError(f"rotate_fraction must be in [0, 1], got {rotate_fraction}")
        n_rotate = int(rotate_fraction * self.projection_size)
        self.n_rotate = n_rotate - n_rotate % 2
        self.pe = RotaryEmbedding(self.n_rotate, rope_base)
        self.reset_parameters(init_scale)

    def attend(self, q, k, v, mask, offset):
        q = self.pe(q, offset)
        k = self.pe(k, 0)
        keep, is_causal = sdpa_mask(mask, q.shape[0], q.shape[-2], k.shape[-2], q.device)
        return self.attention_fn(q, k, v, attn_mask=keep, is_causal=is_causal, scale=1.0)


class SwitchHeadXL(SwitchHeadCore):
    """SwitchHead with Transformer-XL relative positional attention.

    The score of query ``i`` (absolute position ``offset + i``) and key ``j`` is
    ``q_i . k_j + q_i . P(j - offset - i)`` with ``P`` the projected (``pos_to_pk``) sinusoidal
    embedding of the relative position. The positional term enters the attention core as an
    additive float mask, so any SDPA-compatible ``attention_fn`` works.
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
    ):
        super().__init__(
            d_model, n_heads, n_experts, dropout, d_head, expert_dropout, moe_k, attention_fn
        )
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
        pe = torch.zeros(positions.shape[0], d, device=positions.device, dtype=dtype)
        pe[:, 0::2] = torch.sin(angles)
        pe[:, 1::2] = torch.cos(angles)[:, : d // 2]
        return pe

    def attend(self, q, k, v, mask, offset):
        n_q, n_k = q.shape[-2], k.shape[-2]
        # Relative positions j - (offset + i) range over [-(offset + Tq - 1), Tk - 1 - offset].
        lowest = -(offset + n_q - 1)
        positions = torch.arange(lowest, n_k - offset, device=q.device)
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        pos = self._sinusoids(positions, dtype) * self.qk_scale
        pos_k = self._heads(F.linear(pos.to(self.pos_to_pk.dtype), self.pos_to_pk))  # [H, P, d]
        pos_scores = q @ pos_k.transpose(-2, -1).type_as(q)  # [B, H, Tq, P]
        rel = (
            torch.arange(n_k, device=q.device)
            - torch.arange(n_q, device=q.device).unsqueeze(-1)
            - offset
            - lowest
        )
        bias = torch.gather(pos_scores, -1, rel.expand(*pos_scores.shape[:-2], n_q, n_k))
        keep, is_causal = sdpa_mask(mask, q.shape[0], n_q, n_k, q.device)
        if is_causal:
            keep = causal_keep_mask(n_q, n_k, q.device)
        if keep is not None:
            bias = bias.masked_fill(~keep, float("-inf"))
        return self.attention_fn(q, k, v, attn_mask=bias.to(q.dtype), is_causal=False, scale=1.0)
