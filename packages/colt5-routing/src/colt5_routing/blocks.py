"""CoLT5 routed blocks: every token takes a light branch, routed tokens also a heavy one."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .local_attention import LocalMHA
from .rotary import apply_rotary, rotary_angles
from .router import (
    CoordinateDescentRouter,
    check_num_tokens,
    check_token_mask,
    check_tokens,
    scatter_tokens,
)

__all__ = [
    "Attention",
    "ConditionalRoutedAttention",
    "ConditionalRoutedAutoregressiveAttention",
    "ConditionalRoutedCrossAttention",
    "ConditionalRoutedFeedForward",
    "ConditionalRoutedImageAttention",
    "ConditionalRoutedTransformerBlock",
    "FeedForward",
]

AttentionFn = Callable[..., Tensor]


def _scatter(values: Tensor, indices: Tensor, n: int, base: Tensor | None = None) -> Tensor:
    """Scatter-add into ``[b, n, d]``; routed padding positions (``>= n``) are dropped. Shapes
    do not depend on the index values (no read-back, ``torch.compile(fullgraph=True)`` traces)."""
    inside = indices < n
    indices = torch.where(inside, indices, torch.zeros_like(indices))
    values = torch.where(inside.unsqueeze(-1), values, torch.zeros_like(values))
    return scatter_tokens(values, indices, n, base)


def _null_output(null_q_token: Tensor | None, like: Tensor) -> Tensor:
    """``like`` plus the learned output of unrouted queries (if any), in ``like``'s dtype."""
    return like if null_q_token is None else like + null_q_token.to(like.dtype)


def _with_null(base: Tensor, null_q_token: Tensor | None, out: Tensor, idx_q: Tensor) -> Tensor:
    """``base`` plus the learned null output at the positions ``idx_q`` does not route."""
    if null_q_token is None:
        return base
    routed = _scatter(torch.ones_like(out[..., :1]), idx_q, base.shape[1]) > 0
    null = null_q_token.to(base.dtype)
    return base + torch.where(routed, torch.zeros_like(null), null)


def _empty_kv(x: Tensor, routes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Routed tokens, scores and positions of zero routed keys ``[b, routes, 0(, d)]``."""
    b, _, d = x.shape
    return (
        x.new_zeros(b, routes, 0, d),
        x.new_zeros(b, routes, 0),
        torch.zeros(b, routes, 0, dtype=torch.long, device=x.device),
    )


class FeedForward(nn.Module):
    """Pre-norm GELU MLP ``[..., dim] -> [..., dim]`` with hidden width ``dim * mult``."""

    def __init__(self, dim: int, mult: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mult)
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConditionalRoutedFeedForward(nn.Module):
    """Light FFN on all tokens plus a heavy FFN on ``num_heavy_tokens`` routed tokens.
    ``x [b, n, dim]``, ``mask [b, n]`` (``True`` = real token) -> ``[b, n, dim]``."""

    def __init__(
        self,
        dim: int,
        *,
        num_heavy_tokens: int,
        light_ff_mult: float = 0.5,
        heavy_ff_mult: float = 4.0,
        router_straight_through: bool = True,
        router_kwargs: dict | None = None,
        use_triton: bool | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heavy_tokens = check_num_tokens(num_heavy_tokens, 0, "num_heavy_tokens")
        kwargs = dict(router_kwargs or {})
        kwargs.setdefault("use_triton", use_triton)
        self.router = CoordinateDescentRouter(
            dim, straight_through=router_straight_through, **kwargs
        )
        self.light_ff = FeedForward(dim, light_ff_mult)
        self.heavy_ff = FeedForward(dim, heavy_ff_mult)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, num_heavy_tokens: int | None = None
    ) -> Tensor:
        """``num_heavy_tokens`` (default: the constructor's) is clamped to the sequence length;
        0 gives the light branch alone."""
        check_tokens(x, self.dim)
        check_token_mask(mask, x)
        b, n, _ = x.shape
        k = min(check_num_tokens(num_heavy_tokens, self.num_heavy_tokens, "num_heavy_tokens"), n)
        light = self.light_ff(x)
        if k == 0 or b == 0:
            return light
        idx, scores, routed, _ = self.router(x, num_tokens=k, mask=mask)
        heavy = self.heavy_ff(routed)
        heavy = heavy * scores.unsqueeze(-1).to(heavy.dtype)
        return _scatter(heavy, idx, n, light)


class Attention(nn.Module):
    """Pre-norm multi-head attention of ``x [b, nq, dim]`` over ``context [b, (r,) nk, dim]``
    with one learned null key/value per head, so a query never sees an empty key set. With a
    routed-set dimension ``r``, the heads are split into ``r`` groups, one per set.
    ``mask [b, (r,) nk]`` is ``True`` for real keys. ``attention_fn`` has the SDPA signature
    (``attn_mask`` ``True`` = keep).

    Token positions ``q_positions [b, nq]`` and ``kv_positions [b, (r,) nk]`` (default
    ``0, 1, ...``) give the rotary embeddings (``use_rotary``) and, with ``causal=True``, the
    causal mask: a query sees the keys at positions ``<=`` its own (and the null key)."""

    def __init__(
        self,
        dim: int,
        dim_head: int = 64,
        heads: int = 8,
        multiply_keys_by_score: bool = False,
        attention_fn: AttentionFn | None = None,
        use_rotary: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.heads, self.dim_head = heads, dim_head
        self.multiply_keys_by_score = multiply_keys_by_score
        self.use_rotary = use_rotary
        self.attention_fn = attention_fn or F.scaled_dot_product_attention
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.null_kv = nn.Parameter(torch.randn(2, heads, 1, dim_head))
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        normalized_scores_kv: Tensor | None = None,
        normalized_scores_q: Tensor | None = None,
        *,
        q_positions: Tensor | None = None,
        kv_positions: Tensor | None = None,
        causal: bool = False,
    ) -> Tensor:
        check_tokens(x, self.dim)
        b, nq, _ = x.shape
        h, dh = self.heads, self.dim_head
        context = x if context is None else context
        if not isinstance(context, Tensor) or context.ndim not in (3, 4):
            raise ValueError("context must be [batch, nk, dim] or [batch, routes, nk, dim]")
        if context.shape[0] != b or context.shape[-1] != self.dim:
            raise ValueError(
                f"context must be [{b}, (routes,) nk, {self.dim}], got {tuple(context.shape)}"
            )
        sets = context.ndim == 4
        if not sets:
            context = context.unsqueeze(1)
            mask = None if mask is None else mask.unsqueeze(1)
            if normalized_scores_kv is not None and normalized_scores_kv.ndim == 2:
                normalized_scores_kv = normalized_scores_kv.unsqueeze(1)
            if kv_positions is not None and kv_positions.ndim == 2:
                kv_positions = kv_positions.unsqueeze(1)
        r, nk = context.shape[1], context.shape[2]
        if h % r:
            raise ValueError(f"heads ({h}) must be divisible by the number of routed sets ({r})")
        if mask is not None and (mask.dtype != torch.bool or mask.shape != (b, r, nk)):
            raise ValueError(f"mask must be a bool tensor of shape {(b, nk)} or {(b, r, nk)}")
        q = self.to_q(self.norm(x)).view(b, nq, h, dh).transpose(1, 2)
        if normalized_scores_q is not None:  # scale the queries (as upstream), not the input of
            # the norm, which would undo the scale and its gradient
            q = q * normalized_scores_q.unsqueeze(1).unsqueeze(-1).to(q.dtype)
        kv = self.to_kv(self.norm_context(context))  # [b, r, nk, 2 h dh]
        if normalized_scores_kv is not None:  # values always, keys optionally, carry the score
            kk, vv = kv.chunk(2, dim=-1)
            s = normalized_scores_kv.unsqueeze(-1).to(kv.dtype)
            kv = torch.cat([kk * s if self.multiply_keys_by_score else kk, vv * s], dim=-1)
        kv = kv.view(b, r, nk, 2, r, h // r, dh)
        kv = torch.diagonal(kv, dim1=1, dim2=4)  # set i feeds head group i: [b, nk, 2, g, dh, r]
        k, v = kv.permute(2, 0, 5, 3, 1, 4).reshape(2, b, h, nk, dh).unbind(0)
        needs_positions = self.use_rotary or causal
        if needs_positions:
            if q_positions is None:
                q_positions = torch.arange(nq, device=x.device).expand(b, nq)
            if kv_positions is None:
                kv_positions = torch.arange(nk, device=x.device).expand(b, r, nk)
            qpos = q_positions.unsqueeze(1)  # [b, 1, nq]
            kpos = kv_positions.repeat_interleave(h // r, dim=1)  # [b, h, nk]
        if self.use_rotary:
            q = apply_rotary(q, rotary_angles(qpos, dh, q.dtype))
            k = apply_rotary(k, rotary_angles(kpos, dh, k.dtype))
        null_k, null_v = self.null_kv.to(k.dtype).unsqueeze(1).expand(2, b, h, 1, dh)
        k, v = torch.cat([null_k, k], dim=2), torch.cat([null_v, v], dim=2)
        attn_mask = None
        if mask is not None:
            keep = mask.repeat_interleave(h // r, dim=1)  # [b, h, nk]
            attn_mask = F.pad(keep, (1, 0), value=True).unsqueeze(2)
        if causal:
            seen = kpos.unsqueeze(2) <= qpos.unsqueeze(-1)  # [b, h, nq, nk]
            seen = F.pad(seen, (1, 0), value=True)
            attn_mask = seen if attn_mask is None else attn_mask & seen
        out = self.attention_fn(q, k.to(q.dtype), v.to(q.dtype), attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).reshape(b, nq, h * dh))


class ConditionalRoutedAttention(nn.Module):
    """Light local attention on all tokens plus heavy attention between routed queries and
    ``num_routed_kv`` routed key/value sets. ``x [b, n, dim]``, ``mask [b, n]`` ->
    ``[b, n, dim]``.

    ``use_rotary`` gives both branches rotary positional embeddings (the heavy branch by the
    routed tokens' positions in the sequence). ``causal`` makes both branches causal: a query
    attends only to keys at positions ``<=`` its own. Which tokens are routed is still decided
    over the whole sequence; for routing that never looks ahead use
    :class:`ConditionalRoutedAutoregressiveAttention`."""

    def __init__(
        self,
        dim: int,
        *,
        num_heavy_tokens_q: int,
        num_heavy_tokens_kv: int,
        num_routed_kv: int = 1,
        light_dim_head: int = 64,
        light_heads: int = 8,
        light_window_size: int = 128,
        heavy_dim_head: int = 64,
        heavy_heads: int = 8,
        router_straight_through: bool = True,
        router_kwargs: dict | None = None,
        multiply_keys_by_score: bool = False,
        multiply_queries_by_score: bool = False,
        use_triton: bool | None = None,
        use_null_q_tokens: bool = True,
        use_flash_attn: bool = False,
        attention_fn: AttentionFn | None = None,
        causal: bool = False,
        use_rotary: bool = True,
    ) -> None:
        super().__init__()
        del use_flash_attn  # SDPA picks the flash kernel where it can
        if num_routed_kv < 1 or heavy_heads % num_routed_kv:
            raise ValueError(
                f"heavy_heads ({heavy_heads}) must be divisible by num_routed_kv ({num_routed_kv})"
            )
        self.dim = dim
        self.num_heavy_tokens_q = check_num_tokens(num_heavy_tokens_q, 0, "num_heavy_tokens_q")
        self.num_heavy_tokens_kv = check_num_tokens(num_heavy_tokens_kv, 0, "num_heavy_tokens_kv")
        self.multiply_queries_by_score = multiply_queries_by_score
        self.causal = causal
        kwargs = dict(router_kwargs or {})
        kwargs.setdefault("use_triton", use_triton)
        self.light_attn = LocalMHA(
            dim, max(1, light_window_size // 2), light_dim_head, light_heads, causal=causal,
            use_rotary=use_rotary,
        )  # fmt: skip
        self.q_router = CoordinateDescentRouter(
            dim, straight_through=router_straight_through, **kwargs
        )
        self.kv_router = CoordinateDescentRouter(
            dim,
            straight_through=router_straight_through,
            num_routing_tokens=num_routed_kv,
            **kwargs,
        )
        self.heavy_attn = Attention(
            dim, heavy_dim_head, heavy_heads, multiply_keys_by_score, attention_fn,
            use_rotary=use_rotary,
        )  # fmt: skip
        self.null_q_token = nn.Parameter(torch.randn(dim) * 0.02) if use_null_q_tokens else None

    def _heavy(self, x, mask, nq, nkv, light):
        b, n, _ = x.shape
        nq, nkv = min(nq, n), min(nkv, n)
        if nq == 0 or b == 0:  # no routed query: every token gets the null output
            return _null_output(self.null_q_token, light)
        idx_q, s_q, routed_q, _ = self.q_router(x, num_tokens=nq, mask=mask)
        if nkv == 0:  # the queries see the null key alone
            routed_kv, s_kv, idx_kv = _empty_kv(x, self.kv_router.num_routing_tokens)
            kv_mask = None
        else:
            idx_kv, s_kv, routed_kv, kv_mask = self.kv_router(
                x, num_tokens=nkv, mask=mask, keep_one_route_dim=True
            )
        out = self.heavy_attn(
            routed_q,
            context=routed_kv,
            mask=kv_mask,
            normalized_scores_kv=s_kv,
            normalized_scores_q=s_q if self.multiply_queries_by_score else None,
            q_positions=idx_q,
            kv_positions=idx_kv,
            causal=self.causal,
        )
        out = out * s_q.unsqueeze(-1).to(out.dtype)
        return _scatter(out, idx_q, n, _with_null(light, self.null_q_token, out, idx_q))

    def forward(
        self,
        x: Tensor,
        *,
        num_heavy_tokens_q: int | None = None,
        num_heavy_tokens_kv: int | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Token counts default to the constructor's, are clamped to the sequence length, and
        may be 0 (no routed query: the null output; no routed key: the null key alone)."""
        check_tokens(x, self.dim)
        check_token_mask(mask, x)
        nq = check_num_tokens(num_heavy_tokens_q, self.num_heavy_tokens_q, "num_heavy_tokens_q")
        nkv = check_num_tokens(num_heavy_tokens_kv, self.num_heavy_tokens_kv, "num_heavy_tokens_kv")
        light = self.light_attn(x, mask=mask)
        return self._heavy(x, mask, nq, nkv, light)


class ConditionalRoutedCrossAttention(nn.Module):
    """Routed queries of ``x [b, n, dim]`` attend to routed tokens of a long
    ``context [b, m, dim]`` (``kv_routing_tokens`` sets; ``route_block_size`` routes the
    context block by block). Unrouted queries get the learned null output (0 without
    ``use_null_q_tokens``). -> ``[b, n, dim]``. No positional embedding: the queries and keys
    come from different sequences."""

    def __init__(
        self,
        dim: int,
        *,
        num_tokens_q: int,
        num_tokens_kv: int,
        num_sets_kv: int = 1,
        dim_head: int = 64,
        heads: int = 8,
        router_straight_through: bool = True,
        router_kwargs: dict | None = None,
        kv_routing_tokens: int = 1,
        use_triton: bool | None = None,
        use_null_q_tokens: bool = True,
        use_flash_attn: bool = False,
        route_block_size: int | None = None,
        attention_fn: AttentionFn | None = None,
    ) -> None:
        super().__init__()
        del use_flash_attn
        self.dim = dim
        self.num_tokens_q = check_num_tokens(num_tokens_q, 0, "num_tokens_q")
        self.num_tokens_kv = check_num_tokens(num_tokens_kv, 0, "num_tokens_kv")
        if heads % max(kv_routing_tokens, num_sets_kv):
            raise ValueError(
                f"heads ({heads}) must be divisible by the number of routed sets "
                f"({max(kv_routing_tokens, num_sets_kv)})"
            )
        kwargs = dict(router_kwargs or {})
        kwargs.setdefault("use_triton", use_triton)
        self.q_router = CoordinateDescentRouter(
            dim, straight_through=router_straight_through, **kwargs
        )
        self.kv_router = CoordinateDescentRouter(
            dim,
            straight_through=router_straight_through,
            num_routing_tokens=max(kv_routing_tokens, num_sets_kv),
            route_block_size=route_block_size,
            **kwargs,
        )
        self.heavy_attn = Attention(dim, dim_head, heads, attention_fn=attention_fn)
        self.null_q_token = nn.Parameter(torch.randn(dim) * 0.02) if use_null_q_tokens else None

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        *,
        num_tokens_q: int | None = None,
        num_tokens_kv: int | None = None,
        mask: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        check_tokens(x, self.dim)
        check_token_mask(mask, x)
        check_tokens(context, self.dim, "context")
        check_token_mask(context_mask, context, "context_mask")
        if context.shape[0] != x.shape[0] or context.device != x.device:
            raise ValueError(
                f"context must have the batch size and device of x ({x.shape[0]}, {x.device}), "
                f"got {context.shape[0]}, {context.device}"
            )
        b, n, _ = x.shape
        m = context.shape[1]
        nq = min(check_num_tokens(num_tokens_q, self.num_tokens_q, "num_tokens_q"), n)
        nkv = check_num_tokens(num_tokens_kv, self.num_tokens_kv, "num_tokens_kv")
        block = self.kv_router.route_block_size
        nkv = min(nkv, m if block is None else block) if m else 0
        if nq == 0 or b == 0:
            return _null_output(self.null_q_token, torch.zeros_like(x))
        idx_q, s_q, routed_q, _ = self.q_router(x, num_tokens=nq, mask=mask)
        if nkv == 0:
            routed_kv, s_kv, _ = _empty_kv(context, self.kv_router.num_routing_tokens)
            kv_mask = None
        else:
            _, s_kv, routed_kv, kv_mask = self.kv_router(
                context, num_tokens=nkv, mask=context_mask, keep_one_route_dim=True
            )
        out = self.heavy_attn(routed_q, context=routed_kv, mask=kv_mask, normalized_scores_kv=s_kv)
        out = out * s_q.unsqueeze(-1).to(out.dtype)
        base = _with_null(out.new_zeros(b, n, out.shape[-1]), self.null_q_token, out, idx_q)
        return _scatter(out, idx_q, n, base)


class ConditionalRoutedAutoregressiveAttention(nn.Module):
    """Causal CoLT5 attention: causal local attention on all tokens; in each window of
    ``heavy_window_size`` tokens, ``num_heavy_tokens_q`` routed queries attend to
    ``num_heavy_tokens_kv`` keys routed (``num_routed_kv`` sets) from all earlier windows and to
    a null key (key routing costs ``O(n^2 / heavy_window_size)``: use Triton on long inputs).
    Unrouted queries get a learned output (``use_null_q_tokens``).

    Causality: key/value routing only looks at earlier windows. Which queries of a window are
    routed is decided among that window's tokens (as in upstream), so a token's output depends on
    later tokens of its own heavy window through the routing decision only; outputs of earlier
    windows never depend on later ones, and with ``num_heavy_tokens_q == heavy_window_size``
    the block is strictly causal token by token. ``use_rotary`` gives both branches rotary
    positional embeddings (by token position in the sequence)."""

    def __init__(
        self,
        dim: int,
        *,
        num_heavy_tokens_q: int,
        num_heavy_tokens_kv: int,
        num_routed_kv: int = 1,
        light_dim_head: int = 64,
        light_heads: int = 8,
        light_window_size: int = 128,
        heavy_window_size: int | None = None,
        heavy_dim_head: int = 64,
        heavy_heads: int = 8,
        router_straight_through: bool = True,
        router_kwargs: dict | None = None,
        multiply_keys_by_score: bool = False,
        multiply_queries_by_score: bool = False,
        use_triton: bool | None = None,
        use_null_q_tokens: bool = True,
        use_flash_attn: bool = False,
        attention_fn: AttentionFn | None = None,
        use_rotary: bool = True,
    ) -> None:
        super().__init__()
        del use_flash_attn
        self.dim = dim
        self.heavy_window_size = heavy_window_size or light_window_size
        if self.heavy_window_size < 1:
            raise ValueError(f"heavy_window_size must be >= 1, got {self.heavy_window_size}")
        if num_routed_kv < 1 or heavy_heads % num_routed_kv:
            raise ValueError(
                f"heavy_heads ({heavy_heads}) must be divisible by num_routed_kv ({num_routed_kv})"
            )
        self.num_heavy_tokens_q = check_num_tokens(num_heavy_tokens_q, 0, "num_heavy_tokens_q")
        self.num_heavy_tokens_kv = check_num_tokens(num_heavy_tokens_kv, 0, "num_heavy_tokens_kv")
        if self.num_heavy_tokens_q > self.heavy_window_size:
            raise ValueError("num_heavy_tokens_q must be <= heavy_window_size")
        self.multiply_queries_by_score = multiply_queries_by_score
        kwargs = dict(router_kwargs or {})
        kwargs.setdefault("use_triton", use_triton)
        self.light_attn = LocalMHA(
            dim, light_window_size, light_dim_head, light_heads, causal=True, use_rotary=use_rotary
        )
        self.q_router = CoordinateDescentRouter(
            dim, straight_through=router_straight_through, **kwargs
        )
        self.kv_router = CoordinateDescentRouter(
            dim,
            straight_through=router_straight_through,
            num_routing_tokens=num_routed_kv,
            **kwargs,
        )
        self.heavy_attn = Attention(
            dim, heavy_dim_head, heavy_heads, multiply_keys_by_score, attention_fn,
            use_rotary=use_rotary,
        )  # fmt: skip
        self.null_q_token = nn.Parameter(torch.randn(dim) * 0.02) if use_null_q_tokens else None

    def forward(
        self,
        x: Tensor,
        *,
        num_heavy_tokens_q: int | None = None,
        num_heavy_tokens_kv: int | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        check_tokens(x, self.dim)
        check_token_mask(mask, x)
        b, n, d = x.shape
        w = self.heavy_window_size
        nq = min(
            check_num_tokens(num_heavy_tokens_q, self.num_heavy_tokens_q, "num_heavy_tokens_q"), w
        )
        nkv = check_num_tokens(num_heavy_tokens_kv, self.num_heavy_tokens_kv, "num_heavy_tokens_kv")
        light = self.light_attn(x, mask=mask)
        if nq == 0 or b == 0 or n == 0:
            return _null_output(self.null_q_token, light)
        pad = (-n) % w
        keep = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=x.device)
        xp, keep = F.pad(x, (0, 0, 0, pad)), F.pad(keep, (0, pad), value=False)
        nw = (n + pad) // w
        xw, kw = xp.reshape(b * nw, w, d), keep.reshape(b * nw, w)
        idx_q, s_q, routed_q, _ = self.q_router(xw, num_tokens=nq, mask=kw)
        # positions in the (padded) sequence: window j of a batch row starts at j * w
        q_positions = idx_q + (torch.arange(b * nw, device=x.device) % nw).unsqueeze(-1) * w
        if nkv == 0:
            routed_kv, s_kv, idx_kv = _empty_kv(xw, self.kv_router.num_routing_tokens)
            kv_mask = None
        else:  # keys of window i are routed among all tokens of the windows before it
            idx_kv, s_kv, routed_kv, kv_mask = self.kv_router.route_causal_windows(
                xp, window_size=w, num_tokens=nkv, mask=keep
            )
        out = self.heavy_attn(
            routed_q,
            context=routed_kv,
            mask=kv_mask,
            normalized_scores_kv=s_kv,
            normalized_scores_q=s_q if self.multiply_queries_by_score else None,
            q_positions=q_positions,
            kv_positions=idx_kv,
        )
        out = out * s_q.unsqueeze(-1).to(out.dtype)
        base = _with_null(out.new_zeros(b * nw, w, out.shape[-1]), self.null_q_token, out, idx_q)
        heavy = scatter_tokens(out, idx_q, w, base).reshape(b, nw * w, -1)[:, :n]
        return light + heavy.to(light.dtype)


class ConditionalRoutedImageAttention(nn.Module):
    """CoLT5 attention over the pixels of ``x [b, c, h, w]`` (``channel_first``) or
    ``[b, h, w, c]``; returns the same layout. The light branch attends within
    ``light_window_size x light_window_size`` tiles (zero padding at the borders is masked out);
    the heavy branch routes queries and keys among all pixels. ``use_rotary`` defaults to
    ``False`` here (as upstream): rotary embeddings are 1-d, and the pixels are in tile order."""

    def __init__(
        self,
        dim: int,
        *,
        num_heavy_tokens_q: int,
        num_heavy_tokens_kv: int,
        light_window_size: int = 8,
        channel_first: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        if isinstance(light_window_size, bool) or not isinstance(light_window_size, int):
            raise TypeError(f"light_window_size must be an int, got {light_window_size!r}")
        if light_window_size < 1:
            raise ValueError(f"light_window_size must be >= 1, got {light_window_size}")
        self.channel_first = channel_first
        self.window = light_window_size
        kwargs.setdefault("use_rotary", False)
        self.attn = ConditionalRoutedAttention(
            dim,
            num_heavy_tokens_q=num_heavy_tokens_q,
            num_heavy_tokens_kv=num_heavy_tokens_kv,
            light_window_size=2 * light_window_size**2,  # one tile = one local block
            **kwargs,
        )

    def forward(
        self,
        x: Tensor,
        *,
        num_heavy_tokens_q: int | None = None,
        num_heavy_tokens_kv: int | None = None,
    ) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"expected an image batch of 4 dimensions, got {tuple(x.shape)}")
        dim = self.attn.dim
        if x.shape[1 if self.channel_first else 3] != dim:
            layout = "[b, dim, h, w]" if self.channel_first else "[b, h, w, dim]"
            raise ValueError(f"x must be {layout} with dim={dim}, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating point tensor, got {x.dtype}")
        attn = self.attn
        nq = check_num_tokens(num_heavy_tokens_q, attn.num_heavy_tokens_q, "num_heavy_tokens_q")
        nkv = check_num_tokens(num_heavy_tokens_kv, attn.num_heavy_tokens_kv, "num_heavy_tokens_kv")
        if x.numel() == 0:
            return x * 0
        if self.channel_first:
            x = x.permute(0, 2, 3, 1)
        b, h, w, c = x.shape
        ws = self.window
        ph, pw = (-h) % ws, (-w) % ws
        xp = F.pad(x, (0, 0, 0, pw, 0, ph))
        keep = F.pad(x.new_ones(b, h, w, dtype=torch.bool), (0, pw, 0, ph), value=False)
        nh, nw = (h + ph) // ws, (w + pw) // ws
        # pixels in tile-major order: each tile of ws x ws pixels is contiguous
        tiles = xp.reshape(b, nh, ws, nw, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, c)
        tkeep = keep.reshape(b, nh, ws, nw, ws).permute(0, 1, 3, 2, 4).reshape(b, -1)
        light = attn.light_attn(
            tiles.reshape(b * nh * nw, ws * ws, c), mask=tkeep.reshape(b * nh * nw, ws * ws)
        ).reshape(b, nh * nw * ws * ws, -1)
        out = attn._heavy(tiles, tkeep if (ph or pw) else None, nq, nkv, light)
        out = out.reshape(b, nh, nw, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
        out = out.reshape(b, nh * ws, nw * ws, c)[:, :h, :w]
        return out.permute(0, 3, 1, 2) if self.channel_first else out


class ConditionalRoutedTransformerBlock(nn.Module):
    """Residual routed attention followed by a residual routed feedforward, ``[b, n, dim]``.
    ``causal`` and ``use_rotary`` go to :class:`ConditionalRoutedAttention`."""

    def __init__(
        self,
        dim: int,
        *,
        num_heavy_attn_tokens_q: int,
        num_heavy_attn_tokens_kv: int,
        num_routed_kv: int = 1,
        num_heavy_ff_tokens: int,
        light_dim_head: int = 64,
        light_heads: int = 8,
        light_window_size: int = 128,
        heavy_dim_head: int = 64,
        heavy_heads: int = 8,
        light_ff_mult: float = 0.5,
        heavy_ff_mult: float = 4.0,
        router_straight_through: bool = True,
        router_kwargs: dict | None = None,
        multiply_keys_by_score: bool = False,
        multiply_queries_by_score: bool = False,
        use_triton: bool | None = None,
        use_null_q_tokens: bool = True,
        use_flash_attn: bool = False,
        attention_fn: AttentionFn | None = None,
        causal: bool = False,
        use_rotary: bool = True,
    ) -> None:
        super().__init__()
        self.conditional_ff = ConditionalRoutedFeedForward(
            dim,
            num_heavy_tokens=num_heavy_ff_tokens,
            light_ff_mult=light_ff_mult,
            heavy_ff_mult=heavy_ff_mult,
            router_straight_through=router_straight_through,
            router_kwargs=router_kwargs,
            use_triton=use_triton,
        )
        self.conditional_attn = ConditionalRoutedAttention(
            dim,
            num_heavy_tokens_q=num_heavy_attn_tokens_q,
            num_heavy_tokens_kv=num_heavy_attn_tokens_kv,
            num_routed_kv=num_routed_kv,
            light_dim_head=light_dim_head,
            light_heads=light_heads,
            light_window_size=light_window_size,
            heavy_dim_head=heavy_dim_head,
            heavy_heads=heavy_heads,
            router_straight_through=router_straight_through,
            router_kwargs=router_kwargs,
            multiply_keys_by_score=multiply_keys_by_score,
            multiply_queries_by_score=multiply_queries_by_score,
            use_triton=use_triton,
            use_null_q_tokens=use_null_q_tokens,
            use_flash_attn=use_flash_attn,
            attention_fn=attention_fn,
            causal=causal,
            use_rotary=use_rotary,
        )

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        num_heavy_attn_tokens_q: int | None = None,
        num_heavy_attn_tokens_kv: int | None = None,
        num_heavy_ff_tokens: int | None = None,
    ) -> Tensor:
        attn, ff = self.conditional_attn, self.conditional_ff
        check_tokens(x, attn.dim)
        check_token_mask(mask, x)
        check_num_tokens(
            num_heavy_attn_tokens_q, attn.num_heavy_tokens_q, "num_heavy_attn_tokens_q"
        )
        check_num_tokens(
            num_heavy_attn_tokens_kv, attn.num_heavy_tokens_kv, "num_heavy_attn_tokens_kv"
        )
        check_num_tokens(num_heavy_ff_tokens, ff.num_heavy_tokens, "num_heavy_ff_tokens")
        x = x + self.conditional_attn(
            x,
            mask=mask,
            num_heavy_tokens_q=num_heavy_attn_tokens_q,
            num_heavy_tokens_kv=num_heavy_attn_tokens_kv,
        )
        return x + self.conditional_ff(x, mask=mask, num_heavy_tokens=num_heavy_ff_tokens)
