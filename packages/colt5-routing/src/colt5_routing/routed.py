"""The routed heavy branch that every CoLT5 block shares: router set-up (and, for the attention
blocks, the whole heavy branch's set-up), routing, the heavy computation on the routed tokens,
and the score-weighted scatter back with the learned output of unrouted queries.

These helpers hold no state: a block owns its routers, heavy module and null token, so their
state-dict keys stay the block's own (``router.*``, ``q_router.*``, ``null_q_token``, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .coor_descent import check_backend
from .router import CoordinateDescentRouter, RouterReturn, scatter_tokens

__all__ = [
    "add_null",
    "check_router_backends",
    "heavy_attention_parts",
    "make_router",
    "null_query_token",
    "route_heavy",
    "route_keys",
]


def make_router(
    dim: int,
    straight_through: bool,
    router_kwargs: dict | None,
    backend: str | None,
    **options,
) -> CoordinateDescentRouter:
    """A router of ``dim``-wide tokens built from a block's arguments: ``router_kwargs`` (with
    the block's ``backend`` unless they name ``backend`` or ``use_triton``) and the block's own
    ``options`` (e.g. ``num_routing_tokens``; naming one in both is a ``TypeError``). The
    block resolves its deprecated ``use_triton`` first (and warns): ``backend`` may be
    :data:`~colt5_routing.coor_descent.AUTO_TRITON`, which the router takes silently."""
    kwargs = dict(router_kwargs or {})
    if "use_triton" not in kwargs:
        kwargs.setdefault("backend", backend)
    return CoordinateDescentRouter(dim, straight_through=straight_through, **options, **kwargs)


HeavyAttn = TypeVar("HeavyAttn", bound=nn.Module)


def heavy_attention_parts(
    dim: int,
    heavy_attn: Callable[[], HeavyAttn],
    *,
    straight_through: bool,
    router_kwargs: dict | None,
    backend: str | None,
    use_null_q_tokens: bool,
    **kv_router_options: Any,
) -> tuple[CoordinateDescentRouter, CoordinateDescentRouter, HeavyAttn, nn.Parameter | None]:
    """The heavy branch of a routed attention block: its query router, its key/value router
    (``kv_router_options``, e.g. ``num_routing_tokens``; both routers built by
    :func:`make_router` from the block's arguments), its heavy attention ``heavy_attn()`` and the
    learned output of unrouted queries (:func:`null_query_token`). Built in this order, the order
    in which their parameters draw from the random generator; the block stores them as
    ``q_router``, ``kv_router``, ``heavy_attn`` and ``null_q_token`` (its state-dict keys)."""
    router = partial(make_router, dim, straight_through, router_kwargs, backend)
    q_router = router()
    kv_router = router(**kv_router_options)
    return q_router, kv_router, heavy_attn(), null_query_token(dim, use_null_q_tokens)


def check_router_backends(x: Tensor, *routers: CoordinateDescentRouter) -> None:
    """Raise before anything runs where a router's backend cannot run on tensors like ``x``
    (``backend="triton"`` on CPU without the interpreter, float64, ...)."""
    for router in routers:
        check_backend(router.backend, x)


def null_query_token(dim: int, enabled: bool) -> nn.Parameter | None:
    """The learned output ``[dim]`` of queries that are not routed (``None`` unless enabled)."""
    return nn.Parameter(torch.randn(dim) * 0.02) if enabled else None


def add_null(base: Tensor, null_token: Tensor | None, routed: Tensor | None = None) -> Tensor:
    """``base [b, n, d]`` plus ``null_token [d]`` (in ``base``'s dtype) where ``routed
    [b, n, 1]`` is ``False``, or everywhere without ``routed``; ``base`` without a null token."""
    if null_token is None:
        return base
    null = null_token.to(base.dtype)
    return base + (null if routed is None else torch.where(routed, torch.zeros_like(null), null))


def route_keys(
    router: CoordinateDescentRouter,
    x: Tensor,
    num_tokens: int,
    mask: Tensor | None = None,
    *,
    window_size: int | None = None,
) -> RouterReturn:
    """The keys/values of a heavy attention: ``num_tokens`` tokens of ``x [b, n, d]`` per routing
    token, ``[b, r, k(, d)]`` (the route dimension always kept). With ``window_size``, picked for
    each window among the tokens of earlier windows (``[b * n / window_size, r, k(, d)]``, see
    :meth:`CoordinateDescentRouter.route_causal_windows`). ``num_tokens == 0`` gives ``k = 0`` and
    no mask: the queries see the null key alone."""
    if num_tokens == 0:
        b, n, d = x.shape
        rows, r = b if window_size is None else b * (n // window_size), router.num_routing_tokens
        return RouterReturn(
            torch.zeros(rows, r, 0, dtype=torch.long, device=x.device),
            x.new_zeros(rows, r, 0),
            x.new_zeros(rows, r, 0, d),
            None,
        )
    if window_size is not None:
        return router.route_causal_windows(
            x, window_size=window_size, num_tokens=num_tokens, mask=mask
        )
    return router(x, num_tokens=num_tokens, mask=mask, keep_one_route_dim=True)


def route_heavy(
    router: CoordinateDescentRouter,
    x: Tensor,
    num_tokens: int,
    heavy: Callable[[RouterReturn], Tensor],
    *,
    base: Tensor | None = None,
    mask: Tensor | None = None,
    null_token: Tensor | None = None,
) -> Tensor:
    """The routed heavy branch of ``x [b, n, d]`` (``mask [b, n]``, ``True`` = real token):
    ``router`` picks ``num_tokens`` tokens, ``heavy(picked) -> [b, k, d]`` processes them, and its
    output, weighted by the routing scores, is summed onto ``base [b, n, d]`` (default: zeros in
    the heavy output's dtype) at the picked positions. With ``null_token [d]``, every position no
    token was routed to gets it added. ``num_tokens == 0`` (or an empty batch) gives ``base`` (or
    zeros like ``x``) plus the null token everywhere. Returns ``[b, n, d]`` in the promoted dtype
    of ``base`` and the heavy output."""
    b, n, _ = x.shape
    if num_tokens == 0 or b == 0:
        return add_null(torch.zeros_like(x) if base is None else base, null_token)
    picked = router(x, num_tokens=num_tokens, mask=mask)
    out = heavy(picked)
    out = out * picked.scores.unsqueeze(-1).to(out.dtype)
    if base is None:
        base = out.new_zeros(b, n, out.shape[-1])
    if null_token is not None:
        routed = scatter_tokens(torch.ones_like(out[..., :1]), picked.indices, n) > 0
        base = add_null(base, null_token, routed)
    return scatter_tokens(out, picked.indices, n, base)
