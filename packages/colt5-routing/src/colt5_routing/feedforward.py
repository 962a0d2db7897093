"""Feed-forward blocks: a plain MLP and the CoLT5 routed feed-forward."""

from __future__ import annotations

from torch import Tensor, nn

from .coor_descent import use_triton_backend
from .routed import check_router_backends, make_router, route_heavy
from .router import check_num_tokens, check_token_mask, check_tokens

__all__ = ["ConditionalRoutedFeedForward", "FeedForward"]


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
    ``x [b, n, dim]``, ``mask [b, n]`` (``True`` = real token) -> ``[b, n, dim]``.
    ``backend`` (the router's coordinate descent's) and the deprecated ``use_triton`` as in
    :class:`~colt5_routing.ConditionalRoutedAttention`."""

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
        backend: str | None = None,
    ) -> None:
        super().__init__()
        backend = use_triton_backend(backend, use_triton)
        self.dim = dim
        self.num_heavy_tokens = check_num_tokens(num_heavy_tokens, 0, "num_heavy_tokens")
        self.router = make_router(dim, router_straight_through, router_kwargs, backend)
        self.light_ff = FeedForward(dim, light_ff_mult)
        self.heavy_ff = FeedForward(dim, heavy_ff_mult)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, num_heavy_tokens: int | None = None
    ) -> Tensor:
        """``num_heavy_tokens`` (default: the constructor's) is clamped to the sequence length;
        0 gives the light branch alone."""
        check_tokens(x, self.dim)
        check_token_mask(mask, x)
        k = check_num_tokens(num_heavy_tokens, self.num_heavy_tokens, "num_heavy_tokens")
        check_router_backends(x, self.router)
        return route_heavy(
            self.router,
            x,
            min(k, x.shape[1]),
            lambda picked: self.heavy_ff(picked.routed_tokens),
            base=self.light_ff(x),
            mask=mask,
        )
