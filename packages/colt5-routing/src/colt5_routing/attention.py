"""Attention blocks: the heavy attention core and the CoLT5 routed self-, cross- and
autoregressive attention (light local attention on every token, heavy attention between routed
tokens)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .coor_descent import use_triton_backend
from .local_attention import LocalMHA
from .rotary import apply_rotary, rotary_angles
from .routed import add_null, check_router_backends, heavy_attention_parts, route_heavy, route_keys
from .router import RouterReturn, check_num_tokens, check_token_mask, check_tokens

__all__ = [
    "Attention",
    "AttentionFn",
    "ConditionalRoutedAttention",
    "ConditionalRoutedAutoregressiveAttention",
    "ConditionalRoutedCrossAttention",
]

AttentionFn = Callable[..., Tensor]


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
            context, mask, normalized_scores_kv, kv_positions = _as_one_set(
                context, mask, normalized_scores_kv, kv_positions
            )
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


def _as_one_set(
    context: Tensor,
    mask: Tensor | None,
    normalized_scores_kv: Tensor | None,
    kv_positions: Tensor | None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """A context ``[b, nk, dim]`` (with its mask, scores and positions) as one routed set:
    ``[b, 1, nk, dim]``."""
    context = context.unsqueeze(1)
    mask = None if mask is None else mask.unsqueeze(1)
    if normalized_scores_kv is not None and normalized_scores_kv.ndim == 2:
        normalized_scores_kv = normalized_scores_kv.unsqueeze(1)
    if kv_positions is not None and kv_positions.ndim == 2:
        kv_positions = kv_positions.unsqueeze(1)
    return context, mask, normalized_scores_kv, kv_positions


def _attend(attn: Attention, q: RouterReturn, kv: RouterReturn, **options) -> Tensor:
    """``attn`` of routed queries ``q [b, k_q(, d)]`` over routed keys/values
    ``kv [b, r, k_kv(, d)]`` (their routing scores scale the values) -> ``[b, k_q, dim]``."""
    return attn(
        q.routed_tokens,
        context=kv.routed_tokens,
        mask=kv.routed_mask,
        normalized_scores_kv=kv.scores,
        **options,
    )


class ConditionalRoutedAttention(nn.Module):
    """Light local attention on all tokens plus heavy attention between routed queries and
    ``num_routed_kv`` routed key/value sets. ``x [b, n, dim]``, ``mask [b, n]`` ->
    ``[b, n, dim]``.

    ``use_rotary`` gives both branches rotary positional embeddings (the heavy branch by the
    routed tokens' positions in the sequence). ``causal`` makes both branches causal: a query
    attends only to keys at positions ``<=`` its own. Which tokens are routed is still decided
    over the whole sequence; for routing that never looks ahead use
    :class:`ConditionalRoutedAutoregressiveAttention`.

    ``backend`` is the routers' coordinate descent's: ``None`` (Triton for CUDA tensors, else
    the reference), ``"reference"`` or ``"triton"`` (raises before anything runs where Triton
    cannot run). ``use_triton`` is deprecated (``FutureWarning``, until 0.3), see
    :class:`~colt5_routing.CoordinateDescentRouter`."""

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
        backend: str | None = None,
    ) -> None:
        super().__init__()
        del use_flash_attn  # SDPA picks the flash kernel where it can
        backend = use_triton_backend(backend, use_triton)
        if num_routed_kv < 1 or heavy_heads % num_routed_kv:
            raise ValueError(
                f"heavy_heads ({heavy_heads}) must be divisible by num_routed_kv ({num_routed_kv})"
            )
        self.dim = dim
        self.num_heavy_tokens_q = check_num_tokens(num_heavy_tokens_q, 0, "num_heavy_tokens_q")
        self.num_heavy_tokens_kv = check_num_tokens(num_heavy_tokens_kv, 0, "num_heavy_tokens_kv")
        self.multiply_queries_by_score = multiply_queries_by_score
        self.causal = causal
        self.light_attn = LocalMHA(
            dim, max(1, light_window_size // 2), light_dim_head, light_heads, causal=causal,
            use_rotary=use_rotary,
        )  # fmt: skip
        heavy_attn = partial(
            Attention, dim, heavy_dim_head, heavy_heads, multiply_keys_by_score, attention_fn,
            use_rotary=use_rotary,
        )  # fmt: skip
        self.q_router, self.kv_router, self.heavy_attn, self.null_q_token = heavy_attention_parts(
            dim, heavy_attn, straight_through=router_straight_through, router_kwargs=router_kwargs,
            backend=backend, use_null_q_tokens=use_null_q_tokens, num_routing_tokens=num_routed_kv,
        )  # fmt: skip

    def forward(
        self,
        x: Tensor,
        *,
        num_heavy_tokens_q: int | None = None,
        num_heavy_tokens_kv: int | None = None,
        mask: Tensor | None = None,
        light_tile_size: int | None = None,
    ) -> Tensor:
        """Token counts default to the constructor's, are clamped to the sequence length, and
        may be 0 (no routed query: the null output; no routed key: the null key alone).
        ``light_tile_size`` (dividing ``n``) makes each run of that many tokens a sequence of its
        own for the light branch (the pixel tiles of :class:`ConditionalRoutedImageAttention`)."""
        check_tokens(x, self.dim)
        check_token_mask(mask, x)
        nq = check_num_tokens(num_heavy_tokens_q, self.num_heavy_tokens_q, "num_heavy_tokens_q")
        nkv = check_num_tokens(num_heavy_tokens_kv, self.num_heavy_tokens_kv, "num_heavy_tokens_kv")
        check_router_backends(x, self.q_router, self.kv_router)
        n, d = x.shape[1:]
        if light_tile_size is None:
            light = self.light_attn(x, mask=mask)
        else:
            t = check_num_tokens(light_tile_size, 0, "light_tile_size")
            if t == 0 or n % t:
                raise ValueError(f"light_tile_size must be a positive divisor of {n}, got {t}")
            tile_mask = None if mask is None else mask.reshape(-1, t)
            light = self.light_attn(x.reshape(-1, t, d), mask=tile_mask).reshape(x.shape)

        def heavy(q: RouterReturn) -> Tensor:
            kv = route_keys(self.kv_router, x, min(nkv, n), mask)
            return _attend(
                self.heavy_attn,
                q,
                kv,
                normalized_scores_q=q.scores if self.multiply_queries_by_score else None,
                q_positions=q.indices,
                kv_positions=kv.indices,
                causal=self.causal,
            )

        return route_heavy(
            self.q_router, x, min(nq, n), heavy, base=light, mask=mask, null_token=self.null_q_token
        )


class ConditionalRoutedCrossAttention(nn.Module):
    """Routed queries of ``x [b, n, dim]`` attend to routed tokens of a long
    ``context [b, m, dim]`` (``kv_routing_tokens`` sets; ``route_block_size`` routes the
    context block by block). Unrouted queries get the learned null output (0 without
    ``use_null_q_tokens``). -> ``[b, n, dim]``. No positional embedding: the queries and keys
    come from different sequences. ``backend`` (and the deprecated ``use_triton``) as in
    :class:`ConditionalRoutedAttention`."""

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
        backend: str | None = None,
    ) -> None:
        super().__init__()
        del use_flash_attn
        backend = use_triton_backend(backend, use_triton)
        self.dim = dim
        self.num_tokens_q = check_num_tokens(num_tokens_q, 0, "num_tokens_q")
        self.num_tokens_kv = check_num_tokens(num_tokens_kv, 0, "num_tokens_kv")
        routes = max(kv_routing_tokens, num_sets_kv)
        if heads % routes:
            raise ValueError(
                f"heads ({heads}) must be divisible by the number of routed sets ({routes})"
            )
        heavy_attn = partial(Attention, dim, dim_head, heads, attention_fn=attention_fn)
        self.q_router, self.kv_router, self.heavy_attn, self.null_q_token = heavy_attention_parts(
            dim, heavy_attn, straight_through=router_straight_through, router_kwargs=router_kwargs,
            backend=backend, use_null_q_tokens=use_null_q_tokens, num_routing_tokens=routes,
            route_block_size=route_block_size,
        )  # fmt: skip

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
        check_router_backends(x, self.q_router)
        check_router_backends(context, self.kv_router)
        n, m = x.shape[1], context.shape[1]
        nq = min(check_num_tokens(num_tokens_q, self.num_tokens_q, "num_tokens_q"), n)
        nkv = check_num_tokens(num_tokens_kv, self.num_tokens_kv, "num_tokens_kv")
        block = self.kv_router.route_block_size
        nkv = min(nkv, m if block is None else block) if m else 0

        def heavy(q: RouterReturn) -> Tensor:
            return _attend(
                self.heavy_attn, q, route_keys(self.kv_router, context, nkv, context_mask)
            )

        return route_heavy(self.q_router, x, nq, heavy, mask=mask, null_token=self.null_q_token)


class ConditionalRoutedAutoregressiveAttention(nn.Module):
    """Causal CoLT5 attention: causal local attention on all tokens; in each window of
    ``heavy_window_size`` tokens, ``num_heavy_tokens_q`` routed queries attend to
    ``num_heavy_tokens_kv`` keys routed (``num_routed_kv`` sets) from all earlier windows and to
    a null key (key routing costs ``O(n^2 / heavy_window_size)``: use Triton on long inputs).
    Unrouted queries get a learned output (``use_null_q_tokens``). ``x [b, n, dim]``,
    ``mask [b, n]`` -> ``[b, n, dim]``.

    Causality: key/value routing only looks at earlier windows. Which queries of a window are
    routed is decided among that window's tokens (as in upstream), so a token's output depends on
    later tokens of its own heavy window through the routing decision only; outputs of earlier
    windows never depend on later ones, and with ``num_heavy_tokens_q == heavy_window_size``
    the block is strictly causal token by token. ``use_rotary`` gives both branches rotary
    positional embeddings (by token position in the sequence). ``backend`` (and the deprecated
    ``use_triton``) as in :class:`ConditionalRoutedAttention`."""

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
        backend: str | None = None,
    ) -> None:
        super().__init__()
        del use_flash_attn
        backend = use_triton_backend(backend, use_triton)
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
        self.light_attn = LocalMHA(
            dim, light_window_size, light_dim_head, light_heads, causal=True, use_rotary=use_rotary
        )
        heavy_attn = partial(
            Attention, dim, heavy_dim_head, heavy_heads, multiply_keys_by_score, attention_fn,
            use_rotary=use_rotary,
        )  # fmt: skip
        self.q_router, self.kv_router, self.heavy_attn, self.null_q_token = heavy_attention_parts(
            dim, heavy_attn, straight_through=router_straight_through, router_kwargs=router_kwargs,
            backend=backend, use_null_q_tokens=use_null_q_tokens, num_routing_tokens=num_routed_kv,
        )  # fmt: skip

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
        check_router_backends(x, self.q_router, self.kv_router)
        light = self.light_attn(x, mask=mask)
        if nq == 0 or b == 0 or n == 0:
            return add_null(light, self.null_q_token)
        pad = (-n) % w
        keep = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=x.device)
        xp, keep = F.pad(x, (0, 0, 0, pad)), F.pad(keep, (0, pad), value=False)
        nw = (n + pad) // w

        def heavy(q: RouterReturn) -> Tensor:
            # keys of window i are routed among all tokens of the windows before it
            kv = route_keys(self.kv_router, xp, nkv, keep, window_size=w)
            # positions in the (padded) sequence: window j of a batch row starts at j * w
            offsets = (torch.arange(b * nw, device=x.device) % nw).unsqueeze(-1) * w
            return _attend(
                self.heavy_attn,
                q,
                kv,
                normalized_scores_q=q.scores if self.multiply_queries_by_score else None,
                q_positions=q.indices + offsets,
                kv_positions=kv.indices,
            )

        windows = route_heavy(
            self.q_router,
            xp.reshape(b * nw, w, d),
            nq,
            heavy,
            mask=keep.reshape(b * nw, w),
            null_token=self.null_q_token,
        )
        return light + windows.reshape(b, nw * w, -1)[:, :n].to(light.dtype)
