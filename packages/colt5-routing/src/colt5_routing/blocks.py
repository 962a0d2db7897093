"""CoLT5 routed blocks: every token takes a light branch, routed tokens also a heavy one."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .local_attention import LocalMHA
from .router import CoordinateDescentRouter, scatter_tokens

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
    """Scatter-add into ``[b, n, d]``; routed padding positions (``>= n``) are dropped."""
    n_out = max(n, int(indices.max()) + 1) if indices.numel() else n
    if base is not None and n_out > n:
        base = F.pad(base, (0, 0, 0, n_out - n))
    return scatter_tokens(values, indices, n_out, base)[:, :n]


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
        self.num_heavy_tokens = num_heavy_tokens
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
        n = x.shape[1]
        k = min(num_heavy_tokens or self.num_heavy_tokens, n)
        light = self.light_ff(x)
        idx, scores, routed, _ = self.router(x, num_tokens=k, mask=mask)
        heavy = self.heavy_ff(routed) * scores.unsqueeze(-1)
        return _scatter(heavy, idx, n, light)


class Attention(nn.Module):
    """Pre-norm multi-head attention of ``x [b, nq, dim]`` over ``context [b, (r,) nk, dim]``
    with one learned null key/value per head, so a query never sees an empty key set. With a
    routed-set dimension ``r``, the heads are split into ``r`` groups, one per set.
    ``mask [b, (r,) nk]`` is ``True`` for real keys. ``attention_fn`` has the SDPA signature
    (``attn_mask`` ``True`` = keep)."""

    def __init__(
        self,
        dim: int,
        dim_head: int = 64,
        heads: int = 8,
        multiply_keys_by_score: bool = False,
        attention_fn: AttentionFn | None = None,
    ) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.multiply_keys_by_score = multiply_keys_by_score
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
    ) -> Tensor:
        b, nq, _ = x.shape
        h, dh = self.heads, self.dim_head
        if normalized_scores_q is not None:
            x = x * normalized_scores_q.unsqueeze(-1)
        context = x if context is None else context
        sets = context.ndim == 4
        if not sets:
            context = context.unsqueeze(1)
            mask = None if mask is None else mask.unsqueeze(1)
            if normalized_scores_kv is not None and normalized_scores_kv.ndim == 2:
                normalized_scores_kv = normalized_scores_kv.unsqueeze(1)
        r, nk = context.shape[1], context.shape[2]
        if h % r:
            raise ValueError(f"heads ({h}) must be divisible by the number of routed sets ({r})")
        q = self.to_q(self.norm(x)).view(b, nq, h, dh).transpose(1, 2)
        kv = self.to_kv(self.norm_context(context))  # [b, r, nk, 2 h dh]
        if normalized_scores_kv is not None:  # values always, keys optionally, carry the score
            kk, vv = kv.chunk(2, dim=-1)
            s = normalized_scores_kv.unsqueeze(-1)
            kv = torch.cat([kk * s if self.multiply_keys_by_score else kk, vv * s], dim=-1)
        kv = kv.view(b, r, nk, 2, r, h // r, dh)
        kv = torch.diagonal(kv, dim1=1, dim2=4)  # set i feeds head group i: [b, nk, 2, g, dh, r]
        kv = kv.permute(2, 0, 5, 3, 1, 4).reshape(2, b, h, nk, dh)
        null = self.null_kv.unsqueeze(1).expand(2, b, h, 1, dh)
        k, v = torch.cat([null, kv], dim=3).unbind(0)
        attn_mask = None
        if mask is not None:
            keep = mask.repeat_interleave(h // r, dim=1)  # [b, h, nk]
            keep = F.pad(keep, (1, 0), value=True)
            attn_mask = keep.unsqueeze(2)
        out = self.attention_fn(q, k, v, attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).reshape(b, nq, h * dh))


class ConditionalRoutedAttention(nn.Module):
    """Light local attention on all tokens plus heavy attention between routed queries and
    ``num_routed_kv`` routed key/value sets. ``x [b, n, dim]``, ``mask [b, n]`` ->
    ``[b, n, dim]``."""

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
    ) -> None:
        super().__init__()
        del use_flash_attn  # SDPA picks the flash kernel where it can
        self.num_heavy_tokens_q = num_heavy_tokens_q
        self.num_heavy_tokens_kv = num_heavy_tokens_kv
        self.multiply_queries_by_score = multiply_queries_by_score
        kwargs = dict(router_kwargs or {})
        kwargs.setdefault("use_triton", use_triton)
        self.light_attn = LocalMHA(
            dim, max(1, light_window_size // 2), light_dim_head, light_heads, causal=causal
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
            dim, heavy_dim_head, heavy_heads, multiply_keys_by_score, attention_fn
        )
        self.null_q_token = nn.Parameter(torch.randn(dim) * 0.02) if use_null_q_tokens else None

    def _heavy(self, x, mask, nq, nkv, light):
        n = x.shape[1]
        idx_q, s_q, routed_q, _ = self.q_router(x, num_tokens=min(nq, n), mask=mask)
        _, s_kv, routed_kv, kv_mask = self.kv_router(
            x, num_tokens=min(nkv, n), mask=mask, keep_one_route_dim=True
        )
        out = self.heavy_attn(
            routed_q,
            context=routed_kv,
            mask=kv_mask,
            normalized_scores_kv=s_kv,
            normalized_scores_q=s_q if self.multiply_queries_by_score else None,
        )
        out = out * s_q.unsqueeze(-1)
        base = light
        if self.null_q_token is not None:  # learned output for queries the router skipped
            routed = _scatter(torch.ones_like(out[..., :1]), idx_q, n) > 0
            base = light + torch.where(routed, 0.0, self.null_q_token)
        return _scatter(out, idx_q, n, base)

    def forward(
        self,
        x: Tensor,
        *,
        num_heavy_tokens_q: int | None = None,
        num_heavy_tokens_kv: int | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        light = self.light_attn(x, mask=mask)
        return self._heavy(
            x,
            mask,
            num_heavy_tokens_q or self.num_heavy_tokens_q,
            num_heavy_tokens_kv or self.num_heavy_tokens_kv,
            light,
        )


class ConditionalRoutedCrossAttention(nn.Module):
    """Routed queries of ``x [b, n, dim]`` attend to routed tokens of a long
    ``context [b, m, dim]`` (``kv_routing_tokens`` sets; ``route_block_size`` routes the
    context block by block). Unrouted queries get 0. -> ``[b, n, dim]``."""

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
        self.num_tokens_q, self.num_tokens_kv = num_tokens_q, num_tokens_kv
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
        n = x.shape[1]
        nq = min(num_tokens_q or self.num_tokens_q, n)
        nkv = num_tokens_kv or self.num_tokens_kv
        if self.kv_router.route_block_size is None:
            nkv = min(nkv, context.shape[1])
        idx_q, s_q, routed_q, _ = self.q_router(x, num_tokens=nq, mask=mask)
        _, s_kv, routed_kv, kv_mask = self.kv_router(
            context, num_tokens=nkv, mask=context_mask, keep_one_route_dim=True
        )
        out = self.heavy_attn(routed_q, context=routed_kv, mask=kv_mask, normalized_scores_kv=s_kv)
        out = out * s_q.unsqueeze(-1)
        base = torch.zeros_like(x)
        if self.null_q_token is not None:
            routed = _scatter(torch.ones_like(out[..., :1]), idx_q, n) > 0
            base = torch.where(routed, 0.0, self.null_q_token).expand_as(x)
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
    the block is strictly causal token by token."""

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
    ) -> None:
        super().__init__()
        del use_flash_attn
        self.heavy_window_size = heavy_window_size or light_window_size
        if num_heavy_tokens_q > self.heavy_window_size:
            raise ValueError("num_heavy_tokens_q must be <= heavy_window_size")
        self.num_heavy_tokens_q = num_heavy_tokens_q
        self.num_heavy_tokens_kv = num_heavy_tokens_kv
        self.multiply_queries_by_score = multiply_queries_by_score
        kwargs = dict(router_kwargs or {})
        kwargs.setdefault("use_triton", use_triton)
        self.light_attn = LocalMHA(dim, light_window_size, light_dim_head, light_heads, causal=True)
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
            dim, heavy_dim_head, heavy_heads, multiply_keys_by_score, attention_fn
        )
        self.null_q_token = nn.Parameter(torch.randn(dim) * 0.02) if use_null_q_tokens else None

    def forward(
        self,
        x: Tensor,
        *,
        num_heavy_tokens_q: int | None = None,
        num_heavy_tokens_kv: int | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        b, n, d = x.shape
        w = self.heavy_window_size
        nq = min(num_heavy_tokens_q or self.num_heavy_tokens_q, w)
        nkv = num_heavy_tokens_kv or self.num_heavy_tokens_kv
        light = self.light_attn(x, mask=mask)
        pad = (-n) % w
        keep = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=x.device)
        xp, keep = F.pad(x, (0, 0, 0, pad)), F.pad(keep, (0, pad), value=False)
        nw = (n + pad) // w
        xw, kw = xp.view(b * nw, w, d), keep.view(b * nw, w)
        idx_q, s_q, routed_q, _ = self.q_router(xw, num_tokens=nq, mask=kw)
        # keys of window i are routed among all tokens of the windows before it
        _, s_kv, routed_kv, kv_mask = self.kv_router.route_causal_windows(
            xp, window_size=w, num_tokens=nkv, mask=keep
        )
        out = self.heavy_attn(
            routed_q,
            context=routed_kv,
            mask=kv_mask,
            normalized_scores_kv=s_kv,
            normalized_scores_q=s_q if self.multiply_queries_by_score else None,
        )
        out = out * s_q.unsqueeze(-1)
        base = torch.zeros_like(xw)
        if self.null_q_token is not None:
            routed = scatter_tokens(torch.ones_like(out[..., :1]), idx_q, w) > 0
            base = torch.where(routed, 0.0, self.null_q_token).expand_as(xw)
        heavy = scatter_tokens(out, idx_q, w, base).reshape(b, nw * w, d)[:, :n]
        return light + heavy


class ConditionalRoutedImageAttention(nn.Module):
    """CoLT5 attention over the pixels of ``x [b, c, h, w]`` (``channel_first``) or
    ``[b, h, w, c]``; returns the same layout. The light branch attends within
    ``light_window_size x light_window_size`` tiles (zero padding at the borders is masked out);
    the heavy branch routes queries and keys among all pixels."""

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
        self.channel_first = channel_first
        self.window = light_window_size
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
        if x.ndim != 4:
            raise ValueError(f"expected an image batch of 4 dimensions, got {tuple(x.shape)}")
        if self.channel_first:
            x = x.permute(0, 2, 3, 1)
        b, h, w, c = x.shape
        ws = self.window
        ph, pw = (-h) % ws, (-w) % ws
        xp = F.pad(x, (0, 0, 0, pw, 0, ph))
        keep = F.pad(x.new_ones(b, h, w, dtype=torch.bool), (0, pw, 0, ph), value=False)
        nh, nw = (h + ph) // ws, (w + pw) // ws
        # pixels in tile-major order: each tile of ws x ws pixels is contiguous
        tiles = xp.view(b, nh, ws, nw, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, c)
        tkeep = keep.view(b, nh, ws, nw, ws).permute(0, 1, 3, 2, 4).reshape(b, -1)
        light = self.attn.light_attn(
            tiles.reshape(b * nh * nw, ws * ws, c), mask=tkeep.reshape(b * nh * nw, ws * ws)
        ).view(b, -1, c)
        out = self.attn._heavy(
            tiles,
            tkeep if (ph or pw) else None,
            num_heavy_tokens_q or self.attn.num_heavy_tokens_q,
            num_heavy_tokens_kv or self.attn.num_heavy_tokens_kv,
            light,
        )
        out = out.view(b, nh, nw, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, nh * ws, -1, c)
        out = out[:, :h, :w]
        return out.permute(0, 3, 1, 2) if self.channel_first else out


class ConditionalRoutedTransformerBlock(nn.Module):
    """Residual routed attention followed by a residual routed feedforward, ``[b, n, dim]``."""

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
        )

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        num_heavy_attn_tokens_q: int | None = None,
        num_heavy_attn_tokens_kv: int | None = None,
        num_heavy_ff_tokens: int | None = None,
    ) -> Tensor:
        x = x + self.conditional_attn(
            x,
            mask=mask,
            num_heavy_tokens_q=num_heavy_attn_tokens_q,
            num_heavy_tokens_kv=num_heavy_attn_tokens_kv,
        )
        return x + self.conditional_ff(x, mask=mask, num_heavy_tokens=num_heavy_ff_tokens)
