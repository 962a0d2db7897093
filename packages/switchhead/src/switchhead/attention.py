"""SwitchHead attention: value and output projections are mixtures of experts per head.

Each head ``h`` owns ``n_experts`` value matrices ``v[h*E + e]: [d_model, d_head]`` and output
matrices ``o[h*E + e]: [d_head, d_model]``. Per token, sigmoid scores (``sel_v`` from the key
source, ``sel_o`` from the query source) pick the top ``moe_k`` experts of every head; the value
of a head is the score-weighted sum of its chosen experts' projections, and the output is the
score-weighted sum over heads and chosen experts. Queries and keys are plain projections.

Interface and parameter names are those of the authors' code, so their state_dicts load with
``strict=True``. ``n_experts=1`` is standard attention with a learned sigmoid output gate.

Expert projections (``expert_impl``; the paths are in :mod:`switchhead.experts`):

- ``"dense"``: every expert's projection as one dense matmul, the unchosen ones weighted by 0
  (exactly the same function and gradients). It does ``n_experts / moe_k`` times the expert
  FLOPs but in one large cuBLAS matmul each for V and O, with no sort and no host sync.
- ``"cvmm"``: only the chosen experts, through ``cvmm_kernel.moe_linear`` (gathered grouped
  GEMMs on CUDA, sorted by expert, no host sync).
- ``"auto"`` (default): ``"dense"`` while ``n_experts <= DENSE_EXPERT_RATIO * moe_k``, else
  ``"cvmm"``.

Self-attention (``q_src is k_src is v_src``) runs all input projections (q, k, both selections,
all value experts) as ONE matmul with the concatenated weights, RoPE on q and k in one pass, and
both selections' sigmoid/top-k in one pass. The causal default calls the attention core with
``is_causal=True`` and no mask.

Head padding (``pad_head_dim``): heads whose size is not a multiple of 8 (e.g. 100) are padded
internally with zero channels (zero weight rows), so the fused attention kernels take them without
a copy; results are unchanged. ``None`` (default) pads when ``d_head % 8 != 0``.

Selection logits (for entropy regularisers and for inspecting expert choices): set
``module.record_selection_logits = True`` and every forward stores the raw (pre-sigmoid, float32
or float64) selection logits in ``module.last_selection_logits`` as a dict
``{"v": [B, Tk, H, E], "o": [B, Tq, H, E]}`` (``"v"`` absent when ``n_experts == 1``), attached to
the autograd graph so a regulariser can backpropagate through them. With the flag off (default)
``last_selection_logits`` is ``None`` and nothing is kept. Likewise
``module.record_selection_index = True`` keeps the experts each training forward chose (after
expert dropout) in ``module.last_selection_index``: ``{"v": [B, Tk, H, k], "o": [B, Tq, H, k]}``
int64 expert numbers ``head * E + expert`` (for usage statistics; no gradient, nothing extra is
computed on the sparse path, a sort of the ranks on the dense one).

KV cache: pass ``kv_cache={}`` to start caching; ``forward`` returns the new cache, a dict with
``"k"`` and ``"v"`` of shape ``[B, H, T, d_head_padded]`` (keys after RoPE, unscaled). New tokens
continue the positions from the cache length (RoPE offset, XL relative positions).

Attention core (``attention_fn``): any function with SDPA's signature
``fn(q, k, v, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0)``; q, k, v are
``[B, H, T, d]``, ``attn_mask`` is boolean ``True`` = keep (or an additive float bias for XL), and
``scale`` is ``1 / sqrt(d_head)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import shared_projection
from .experts import EXPERT_PATHS, ExpertPath
from .inputs import check_layer_inputs
from .masks import AttentionMask, check_mask, sdpa_mask
from .rope import RotaryEmbedding

KVCache = dict[str, torch.Tensor] | None
AttentionFn = Callable[..., torch.Tensor]
# How the fused projection reads a parameter (itself, or a stand-in: switchhead.shared_projection)
ParamLookup = Callable[[torch.Tensor], torch.Tensor]


def _itself(p: torch.Tensor) -> torch.Tensor:
    return p


# "auto" computes all experts densely while they are at most this many times the chosen ones.
# Measured on an H100 (benchmarks/results/switchhead_quick.md, T=1024, d_head 128): from CUDA
# graphs the sparse path (moe_linear) wins at 4 and 5 times (4x8: 1.43 vs 2.21 ms; 4x10: 1.57 vs
# 2.62), eager the dense path does (host-bound: 3.15 vs 4.04 ms at 4x8); at 2 times dense wins both,
# also against moe_linear's dense slot layouts (4x4 d_head 100 from CUDA graphs: 0.82 vs 1.20 ms at
# T=1024, 3.30 vs 5.06 at T=4096; benchmarks/results/ab_dense_slots_layer.md).
DENSE_EXPERT_RATIO = 4


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
        expert_impl: str = "auto",
        pad_head_dim: bool | None = None,
    ):
        super().__init__()
        if n_experts < 1 or n_heads < 1:
            raise ValueError(f"n_heads and n_experts must be >= 1, got {n_heads}, {n_experts}")
        if n_experts > 1 and not 1 <= moe_k <= n_experts:
            raise ValueError(f"moe_k must be in [1, n_experts={n_experts}], got {moe_k}")
        if not 0.0 <= expert_dropout < 1.0 or not 0.0 <= dropout < 1.0:
            raise ValueError(
                f"dropout and expert_dropout must be in [0, 1), got {dropout}, {expert_dropout}"
            )
        if expert_impl not in ("auto", "dense", "cvmm"):
            raise ValueError(f"expert_impl must be 'auto', 'dense' or 'cvmm', got {expert_impl!r}")
        self.input_size = self.output_size = d_model
        self.n_heads = n_heads
        self.n_experts = n_experts
        self.moe_k = min(moe_k, n_experts)
        self.expert_dropout = expert_dropout
        self.projection_size = d_head or d_model // n_heads
        if self.projection_size < 1:
            raise ValueError(f"d_head must be >= 1, got {self.projection_size}")
        if pad_head_dim is None:
            pad_head_dim = self.projection_size % 8 != 0
        self.head_size = -(-self.projection_size // 8) * 8 if pad_head_dim else self.projection_size
        if expert_impl == "auto":
            dense = n_experts <= DENSE_EXPERT_RATIO * self.moe_k
            expert_impl = "dense" if dense else "cvmm"
        self.expert_impl = expert_impl if n_experts > 1 else "dense"
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.attention_fn = attention_fn or F.scaled_dot_product_attention
        self.record_selection_logits = False
        self.last_selection_logits: dict[str, torch.Tensor] | None = None
        self.record_selection_index = False
        self.last_selection_index: dict[str, torch.Tensor] | None = None
        # True: the cvmm experts' weight gradients come rounded to the compute dtype from each
        # call (cvmm_kernel.moe_linear's weight_grads_in_compute_dtype; for layers applied
        # several times in a compiled step, as MoEUT's)
        self.weight_grads_in_compute_dtype = False

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
        # Attention logits are q.k / sqrt(d_head) (the authors scale q and k by its square root).
        self.scale = 1.0 / math.sqrt(self.projection_size)

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

    # ----- weights in "rows" form (F.linear), heads padded to head_size -----

    def _pad_rows(self, w: torch.Tensor) -> torch.Tensor:
        """``[G * d_head, d_model]`` -> ``[G * head_size, d_model]`` (zero rows per group)."""
        pad = self.head_size - self.projection_size
        if pad == 0:
            return w
        return F.pad(w.view(-1, self.projection_size, w.shape[-1]), (0, 0, 0, pad)).flatten(0, 1)

    def _qk_rows(self, param: ParamLookup = _itself) -> list[torch.Tensor]:
        return [self._pad_rows(param(self.q.weight)), self._pad_rows(param(self.k.weight))]

    def _v_rows(self, param: ParamLookup = _itself) -> torch.Tensor:
        """Value projection rows ``[H * E * head_size, d_model]`` (head-major, then expert)."""
        if self.n_experts == 1:
            return self._pad_rows(param(self.v))
        pad = self.head_size - self.projection_size
        v = param(self.v).transpose(1, 2)  # [H*E, d_head, d_model]
        return (F.pad(v, (0, 0, 0, pad)) if pad else v).reshape(-1, self.input_size)

    def _fused_rows(self, with_values: bool, param: ParamLookup = _itself):
        """The self-attention input projection's fused weight ``[rows, d_model]`` (q and k rows,
        the value experts' where ``with_values``, the selections', zero rows up to a multiple of
        8: head-sized blocks first, so that the q/k/v views handed to the attention kernel are
        16-byte aligned) and the part sizes ``[q and k, values?, selections]`` (the last with
        its padding), with each parameter ``p`` read as ``param(p)``."""
        sels = [param(self.sel_o), param(self.sel_v)] if self.n_experts > 1 else [param(self.sel_o)]
        v_rows = [self._v_rows(param)] if with_values else []
        sizes = self._fused_sizes(with_values)
        sel_pad = sizes[-1] - sum(r.shape[0] for r in sels)
        pad_rows = [sels[0].new_zeros(sel_pad, self.input_size)] if sel_pad else []
        return torch.cat(self._qk_rows(param) + v_rows + sels + pad_rows), sizes

    def _fused_sizes(self, with_values: bool) -> list[int]:
        """The fused input projection's part sizes (see :meth:`_fused_rows`)."""
        h, e, hs = self.n_heads, self.n_experts, self.head_size
        n_sel = (2 if e > 1 else 1) * h * e
        return [2 * h * hs] + ([h * e * hs] if with_values else []) + [n_sel + -n_sel % 8]

    def _shared_fusion(self):
        """``(parameters, fusion)`` of the fused input projection for
        :mod:`switchhead.shared_projection` (the eager fusion: value experts included where
        the expert path fuses them)."""
        fuses_values = self.experts.fuses_values
        params = [self.q.weight, self.k.weight, self.sel_o]
        params += [self.sel_v] if self.n_experts > 1 else []
        params += [self.v] if fuses_values else []
        return params, lambda param: self._fused_rows(fuses_values, param)[0]

    def _o_cols(self) -> torch.Tensor:
        """Output projection ``[H * E * head_size, d_model]`` for ``A @ W``."""
        pad = self.head_size - self.projection_size
        o = self.o if self.n_experts > 1 else self.o.t().view(self.n_heads, -1, self.output_size)
        return (F.pad(o, (0, 0, 0, pad)) if pad else o).reshape(-1, self.output_size)

    @property
    def experts(self) -> ExpertPath:
        """The expert path of ``expert_impl`` (:mod:`switchhead.experts`)."""
        return EXPERT_PATHS[self.expert_impl]

    # ----- forward -----

    def _project(self, q_src, k_src, v_src):
        """Input projections.

        Returns ``q [B, Tq, H, hs]``, ``k [B, Tk, H, hs]`` (before RoPE), ``qk`` (``[B, T, 2, H,
        hs]`` when q and k come from one source, else ``None``), the selection logits
        ``{"o": [B, Tq, H, E], "v": [B, Tk, H, E]}`` (float) and the value experts
        ``[B, Tk, H, E, hs]`` (dense) or ``None`` (cvmm).
        """
        h, e, hs = self.n_heads, self.n_experts, self.head_size
        dense_v = self.experts.fuses_values
        sels = [self.sel_o, self.sel_v] if e > 1 else [self.sel_o]
        # Under torch.compile the value experts get a matmul of their own: fused into this one,
        # Inductor turned the backward of the split (RoPE, the q/k stack and every part's
        # gradient concatenated) into one kernel 4-5x slower than its traffic (0.66-0.82 ms at
        # T=4096; the layer 3.87 vs 3.51 ms: benchmarks/results/ab_compiled_values_apart.md).
        v_apart = torch.compiler.is_compiling()
        if q_src is k_src and (k_src is v_src or not dense_v):
            # the fused layout of _fused_rows: 16-byte aligned q/k/v views for the attention
            # kernel (PyTorch's memory-efficient kernel faults on misaligned views instead of
            # rejecting them)
            rows = shared_projection.rows_of(self)
            if rows is not None and not v_apart:  # the weight and its gradient's sum shared
                sizes = self._fused_sizes(dense_v)
                projected = shared_projection.shared_linear(rows, q_src)
            else:
                w, sizes = self._fused_rows(dense_v and not v_apart)
                projected = F.linear(q_src, w)
            parts = torch.split(projected, sizes, dim=-1)
            n_sel = len(sels) * h * e
            sel_pad = sizes[-1] - n_sel
            bt = q_src.shape[:-1]
            qk = parts[0].view(*bt, 2, h, hs)
            q, k = qk.unbind(-3)
            # sliced only past padding columns: a slice's backward copies even a full-width one
            sel_rows = parts[-1][..., :n_sel] if sel_pad else parts[-1]
            sel = _float(sel_rows).view(*bt, len(sels), h, e).unbind(-3)
            logits = dict(zip(("o", "v"), sel))
            v_all = None
            if dense_v:
                v_all = (F.linear(q_src, self._v_rows()) if v_apart else parts[1]).view(
                    *bt, h, e, hs
                )
            return q, k, qk, logits, v_all
        q_rows, k_rows = self._qk_rows()
        logits = {"o": _float(F.linear(q_src, self.sel_o)).view(*q_src.shape[:-1], h, e)}
        q = F.linear(q_src, q_rows).view(*q_src.shape[:-1], h, hs)
        k = F.linear(k_src, k_rows).view(*k_src.shape[:-1], h, hs)
        if e > 1:
            logits["v"] = _float(F.linear(k_src, self.sel_v)).view(*k_src.shape[:-1], h, e)
        v_all = None
        if dense_v:
            v_all = F.linear(v_src, self._v_rows()).view(*v_src.shape[:-1], h, e, hs)
        return q, k, None, logits, v_all

    def _values(self, v_src, v_all, logits) -> torch.Tensor:
        """Values ``[B, Tk, H, hs]`` from the expert projections and the V selection."""
        if self.n_experts == 1:
            return v_all.squeeze(-2)
        return self.experts.values(self, v_src, v_all, logits["v"])

    def _output(self, res: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``res [B, Tq, H, hs]`` -> ``[B, Tq, d_model]`` through the gated output experts."""
        return self.experts.output(self, res, logits)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: AttentionMask | None,
        offset: int,
    ) -> torch.Tensor:
        """Attention core: ``q [B, H, Tq, hs]``, ``k, v [B, H, Tk, hs]`` -> ``[B, H, Tq, hs]``;
        query ``i`` is at position ``offset + i``, key ``j`` at ``j``."""
        raise NotImplementedError

    def _position(self, q, k, qk, offset):
        """Position encoding of q and k before attention (``[B, T, H, hs]``); none by default."""
        return q, k

    def _check_inputs(self, q_src, k_src, v_src, kv_cache) -> int:
        """Raise for sources or caches that the forward cannot use; returns the cache length."""
        srcs = {"q_src": q_src, "k_src": k_src, "v_src": v_src}
        for name, t in srcs.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if (
            q_src.dim() != 3
            or k_src.dim() != 3
            or v_src.dim() != 3
            or v_src.shape[:-1] != k_src.shape[:-1]
            or q_src.shape[0] != k_src.shape[0]
            or not q_src.shape[-1] == k_src.shape[-1] == v_src.shape[-1] == self.input_size
        ):
            raise ValueError(
                f"q_src, k_src, v_src must be [B, T, d_model={self.input_size}] with equal batch "
                f"and equal k/v lengths, got {tuple(q_src.shape)}, {tuple(k_src.shape)}, "
                f"{tuple(v_src.shape)}"
            )
        weight = self.q.weight
        check_layer_inputs(srcs, weight, "q_src, k_src, v_src")
        offset = 0
        if kv_cache is not None:
            if not isinstance(kv_cache, dict):
                raise TypeError(
                    f"kv_cache must be None, {{}} or a returned cache, got {kv_cache!r}"
                )
            if kv_cache:
                ck, cv = kv_cache.get("k"), kv_cache.get("v")
                if not isinstance(ck, torch.Tensor) or not isinstance(cv, torch.Tensor):
                    raise ValueError(
                        f"kv_cache must be empty or hold tensors 'k' and 'v', got keys "
                        f"{sorted(kv_cache)}"
                    )
                b, h, hs = q_src.shape[0], self.n_heads, self.head_size
                if (
                    ck.dim() != 4
                    or ck.shape != cv.shape
                    or (ck.shape[0], ck.shape[1], ck.shape[3]) != (b, h, hs)
                ):
                    raise ValueError(
                        f"kv_cache 'k' and 'v' must be [B={b}, H={h}, T, head_size={hs}], got "
                        f"{tuple(ck.shape)} and {tuple(cv.shape)}"
                    )
                if ck.device != weight.device or cv.device != weight.device:
                    raise ValueError(f"kv_cache must be on {weight.device}, got {ck.device}")
                offset = ck.shape[-2]
        if q_src.shape[1] > 0 and offset + k_src.shape[1] == 0:
            raise ValueError("there is no key to attend to (Tk = 0 and no KV cache)")
        return offset

    def forward(
        self,
        q_src: torch.Tensor,
        k_src: torch.Tensor,
        v_src: torch.Tensor,
        mask: AttentionMask | None = None,
        kv_cache: KVCache = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Attend from ``q_src [B, Tq, d_model]`` to ``k_src``/``v_src [B, Tk, d_model]``.

        Queries take positions ``cache_length + i``, new keys ``cache_length + j`` (also for
        cross-attention with ``Tq != Tk``).

        Args:
            q_src, k_src, v_src: floating point (the parameters' dtype outside autocast), on
                the parameters' device; any strides. ``Tq = 0`` gives an empty
                output; there must be at least one key (cache included) when ``Tq > 0``.
            mask: ``None`` = causal (bottom-right aligned over cache + new keys, needs
                ``Tq <= Tk``); ``AttentionMask()`` = none; ``AttentionMask(..., causal=True)``
                adds the causal mask to the given ones. Shapes (``Tk`` includes the cache):
                ``position_mask`` ``[Tq, Tk]``, ``[B, Tq, Tk]`` or ``[B, H, Tq, Tk]`` (``B``,
                ``H`` may be 1), ``src_length_mask`` ``[B, Tk]``; see :mod:`switchhead.masks`.
            kv_cache: ``None`` (no cache returned), ``{}`` to start one, or a returned cache
                (``{"k", "v"}``: ``[B, H, T_cache, head_size]``).

        Returns:
            ``([B, Tq, d_model], cache or None)``.

        Raises:
            TypeError, ValueError: for inputs, masks or caches outside the above, before any
            computation.
        """
        offset = self._check_inputs(q_src, k_src, v_src, kv_cache)
        check_mask(
            mask,
            q_src.shape[0],
            q_src.shape[1],
            offset + k_src.shape[1],
            q_src.device,
            self.n_heads,
        )

        q, k, qk, logits, v_all = self._project(q_src, k_src, v_src)
        self.last_selection_logits = logits if self.record_selection_logits else None
        recording = self.record_selection_index and self.training and self.n_experts > 1
        self.last_selection_index = {} if recording else None  # the expert path fills it
        if isinstance(self.dropout, torch.nn.Dropout) and self.training:
            q, qk = self.dropout(q), None
        q, k = self._position(q, k, qk, offset)
        v = self._values(v_src, v_all, logits)

        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, hs]
        if kv_cache is not None:
            if "k" in kv_cache:
                if kv_cache["k"].dtype != k.dtype or kv_cache["v"].dtype != v.dtype:
                    # (dtypes under autocast depend on the op, so this is checked here)
                    raise TypeError(
                        f"kv_cache holds {kv_cache['k'].dtype}/{kv_cache['v'].dtype} keys/values "
                        f"but this step's are {k.dtype}/{v.dtype}: decode with the dtype and "
                        "autocast setting the cache was made with"
                    )
                k = torch.cat([kv_cache["k"], k], dim=-2)
                v = torch.cat([kv_cache["v"], v], dim=-2)
            kv_cache = {"k": k, "v": v}

        res = self.attend(q, k, v, mask, offset).transpose(1, 2)  # [B, Tq, H, hs]
        if self.n_experts == 1:
            gate = logits["o"].sigmoid().to(res.dtype)  # [B, Tq, H, 1]
            return torch.matmul((res * gate).flatten(-2), self._o_cols()), kv_cache
        return self._output(res, logits["o"]), kv_cache


def _autocast_enabled(device: torch.device) -> bool:
    """Whether autocast is on for ``device`` (never for ``meta``, which autocast rejects)."""
    return device.type != "meta" and torch.is_autocast_enabled(device.type)


def _float(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (selection scores are computed in float32 also under autocast)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


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
        expert_impl: ``"auto"``, ``"dense"`` or ``"cvmm"`` (see the module docstring).
        pad_head_dim: pad heads to a multiple of 8 internally (``None``: when needed).
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
        expert_impl: str = "auto",
        pad_head_dim: bool | None = None,
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
        if not 0.0 <= rotate_fraction <= 1.0:
            raise ValueError(f"rotate_fraction must be in [0, 1], got {rotate_fraction}")
        n_rotate = int(rotate_fraction * self.projection_size)
        self.n_rotate = n_rotate - n_rotate % 2
        self.pe = RotaryEmbedding(self.n_rotate, rope_base, self.head_size)
        self.reset_parameters(init_scale)

    def _position(self, q, k, qk, offset):
        if qk is not None:  # q and k of one source: rotate both in one pass
            return self.pe(qk, offset, seq_dim=1).unbind(-3)
        return self.pe(q, offset, seq_dim=1), self.pe(k, offset, seq_dim=1)

    def attend(self, q, k, v, mask, offset):
        keep, is_causal = sdpa_mask(
            mask, q.shape[0], q.shape[-2], k.shape[-2], q.device, self.n_heads
        )
        return self.attention_fn(q, k, v, attn_mask=keep, is_causal=is_causal, scale=self.scale)


def __getattr__(name: str):
    # SwitchHeadXL moved to switchhead.xl; keep ``from switchhead.attention import SwitchHeadXL``.
    if name == "SwitchHeadXL":
        from .xl import SwitchHeadXL

        return SwitchHeadXL
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
