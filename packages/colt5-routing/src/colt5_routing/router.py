"""The CoLT5 coordinate-descent router: picks the tokens a heavy branch processes."""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .coor_descent import (
    ALIASES_REMOVED_IN,
    AUTO_TRITON,
    _coor_descent,
    check_backend,
    use_triton_backend,
)

__all__ = ["CoordinateDescentRouter", "RouterReturn", "gather_tokens", "scatter_tokens"]


class RouterReturn(NamedTuple):
    """``indices [b, (r,) k]``, ``scores [b, (r,) k]`` (straight-through weights),
    ``routed_tokens [b, (r,) k, d]`` and ``routed_mask [b, (r,) k]`` (``True`` = real token, or
    ``None`` without an input mask). The ``r`` dimension is dropped for one routing token unless
    ``keep_one_route_dim``."""

    indices: Tensor
    scores: Tensor
    routed_tokens: Tensor
    routed_mask: Tensor | None


def check_tokens(x: Tensor, dim: int, name: str = "x") -> None:
    """Raise a clear error unless ``x`` is a floating point ``[batch, seq, dim]`` tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.ndim != 3 or x.shape[-1] != dim:
        raise ValueError(f"{name} must be [batch, seq, {dim}], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {x.dtype}")


def check_token_mask(mask: Tensor | None, x: Tensor, name: str = "mask") -> None:
    """Raise a clear error unless ``mask`` is ``None`` or a bool ``[batch, seq]`` tensor on the
    device of ``x [batch, seq, d]``."""
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a bool tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = real token), got {mask.dtype}")
    if mask.shape != x.shape[:2]:
        raise ValueError(f"{name} must have shape {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"{name} is on {mask.device}, the tokens on {x.device}")


def check_num_tokens(value: int | None, default: int, name: str) -> int:
    """``value`` (or ``default`` when ``None``) as a non-negative int; clear errors otherwise."""
    k = default if value is None else value
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if k < 0:
        raise ValueError(f"{name} must be >= 0, got {k}")
    return k


def gather_tokens(x: Tensor, indices: Tensor) -> Tensor:
    """``x [b, n, d]`` and ``indices [b, ..., k]`` -> ``[b, ..., k, d]``."""
    b, _, d = x.shape
    flat = indices.reshape(b, math.prod(indices.shape[1:]), 1).expand(-1, -1, d)
    return x.gather(1, flat).reshape(*indices.shape, d)


def scatter_tokens(values: Tensor, indices: Tensor, n: int, base: Tensor | None = None) -> Tensor:
    """Sum ``values [b, ..., k, d]`` into ``[b, n, d]`` at ``indices [b, ..., k]`` (onto base);
    indices ``>= n`` (the padding picks of a blocked router) are dropped. The result has the
    promoted dtype of ``values`` and ``base``. Shapes do not depend on the index values (no
    read-back: ``torch.compile(fullgraph=True)`` traces it)."""
    inside = indices < n
    indices = torch.where(inside, indices, torch.zeros_like(indices))
    values = torch.where(inside.unsqueeze(-1), values, torch.zeros_like(values))
    b, d = values.shape[0], values.shape[-1]
    out = values.new_zeros(b, n, d) if base is None else base
    dtype = torch.promote_types(values.dtype, out.dtype)
    m = math.prod(indices.shape[1:])
    flat = indices.reshape(b, m, 1).expand(-1, -1, d)
    return out.to(dtype).scatter_add(1, flat, values.reshape(b, m, d).to(dtype))


class CoordinateDescentRouter(nn.Module):
    """Scores tokens against ``num_routing_tokens`` routing vectors and selects ``num_tokens``
    per routing token with a differentiable top-k (coordinate descent).

    Argument names follow ``colt5_attention.CoordinateDescentRouter``. ``route_block_size`` routes
    within blocks of that many tokens (``num_tokens`` per block). ``backend`` (the attribute of
    the same name) is the coordinate descent's, as in :func:`~colt5_routing.coor_descent`:
    ``None`` (Triton for CUDA tensors, else the reference), ``"reference"`` or ``"triton"``
    (raises at the call where Triton cannot run for the tokens). ``use_triton`` is deprecated
    (``FutureWarning``, until 0.3): ``False`` is ``backend="reference"``; ``True`` runs Triton
    where it can (CUDA, or CPU under ``TRITON_INTERPRET=1``) and the reference elsewhere.
    """

    def __init__(
        self,
        dim: int,
        straight_through: bool = True,
        n_iters: int = 20,
        fetch_k_ratio: float = 9 / 8,
        eps: float = 0.03,
        eps_decay: float = 0.7,
        eps_init: float = 4.0,
        num_routing_tokens: int = 1,
        learned_routing_tokens: bool = False,
        use_triton: bool | None = None,
        cosine_sim_routing: bool = False,
        cosine_sim_scale: float = 8.0,
        route_block_size: int | None = None,
        triton_checkpoint_segments: int | None = None,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        backend = use_triton_backend(backend, use_triton)
        if fetch_k_ratio < 1:
            raise ValueError("fetch_k_ratio must be >= 1")
        self.dim = dim
        self.straight_through = straight_through
        self.n_iters = n_iters
        self.fetch_k_ratio = fetch_k_ratio
        self.eps, self.eps_decay, self.eps_init = eps, eps_decay, eps_init
        self.num_routing_tokens = num_routing_tokens
        self.learned_routing_tokens = learned_routing_tokens
        self.backend = backend
        self.cosine_sim_routing = cosine_sim_routing
        self.cosine_sim_scale = cosine_sim_scale
        self.route_block_size = route_block_size
        self.triton_checkpoint_segments = triton_checkpoint_segments or 1
        self.routing_token = (
            None if learned_routing_tokens else nn.Parameter(torch.randn(num_routing_tokens, dim))
        )

    @property
    def use_triton(self) -> bool | None:
        """Deprecated (until 0.3; read ``backend``): ``None`` for ``backend=None``, ``False`` for
        ``"reference"``, ``True`` for the Triton backends. Setting it sets ``backend`` as the
        constructor argument does."""
        self._warn_use_triton_attribute()
        return None if self.backend is None else self.backend != "reference"

    @use_triton.setter
    def use_triton(self, value: bool | None) -> None:
        self._warn_use_triton_attribute()
        self.backend = None if value is None else AUTO_TRITON if value else "reference"

    @staticmethod
    def _warn_use_triton_attribute() -> None:
        warnings.warn(
            "CoordinateDescentRouter.use_triton is deprecated and goes away in colt5-routing "
            f"{ALIASES_REMOVED_IN}; use .backend (None, 'reference' or 'triton')",
            FutureWarning,
            stacklevel=3,
        )

    def _scores(self, x: Tensor, routing_tokens: Tensor | None, batch: int) -> Tensor:
        """Scores ``[batch, r, n]`` of ``x [batch, n, d]`` against the routing tokens."""
        if self.learned_routing_tokens:
            if routing_tokens is None:
                raise ValueError("routing_tokens [b, r, d] are required (learned_routing_tokens)")
            rt = routing_tokens
            if rt.shape[0] != batch:
                rt = rt.repeat_interleave(batch // rt.shape[0], dim=0)
        elif routing_tokens is not None:
            raise ValueError("routing_tokens are only taken with learned_routing_tokens=True")
        else:
            # a Parameter unless learned_routing_tokens
            rt = self.routing_token.unsqueeze(0).expand(batch, -1, -1)  # type: ignore[union-attr]
        if self.cosine_sim_routing:
            scores = torch.einsum("bnd,brd->brn", F.normalize(x, dim=-1), F.normalize(rt, dim=-1))
            return scores * self.cosine_sim_scale
        return torch.einsum("bnd,brd->brn", x, rt)

    def _weights(self, scores: Tensor, num_tokens: int, score_mask: Tensor | None) -> Tensor:
        """Coordinate-descent weights of ``scores [..., n]``; masked rows ask for at most their
        number of real tokens."""
        k: float | Tensor = min(num_tokens * self.fetch_k_ratio, scores.shape[-1])
        if score_mask is not None:
            k = score_mask.sum(-1).float().clamp(min=1.0).clamp(max=float(k))
        return _coor_descent(
            scores,
            n_iters=self.n_iters,
            k=k,
            eps=self.eps,
            eps_init=self.eps_init,
            eps_decay=self.eps_decay,
            mask=score_mask,
            backend=self.backend,
            checkpoint_segments=self.triton_checkpoint_segments,
        )

    def route_causal_windows(
        self, x: Tensor, *, window_size: int, num_tokens: int, mask: Tensor | None = None
    ) -> RouterReturn:
        """For each window ``i`` of ``window_size`` tokens of ``x [b, n, d]`` (``n`` a multiple
        of ``window_size``), select ``num_tokens`` among the tokens of windows ``< i``.
        Returns tensors of shape ``[b * n_windows, r, num_tokens(, d)]``; ``routed_mask`` is
        ``False`` where a window has fewer earlier tokens than ``num_tokens``."""
        check_tokens(x, self.dim)
        check_token_mask(mask, x)
        check_backend(self.backend, x)
        b, n, d = x.shape
        if window_size < 1 or n % window_size:
            raise ValueError("sequence length must be a multiple of window_size (>= 1)")
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        nw = n // window_size
        num_tokens = min(num_tokens, n)
        scores = self._scores(x, None, b)  # [b, r, n]
        r = scores.shape[1]
        start = torch.arange(nw, device=x.device)[:, None] * window_size
        earlier = torch.arange(n, device=x.device)[None, :] < start  # [nw, n]
        keep = earlier[None] if mask is None else earlier[None] & mask[:, None, :]
        score_mask = keep[:, :, None, :].expand(b, nw, r, n)
        weights = self._weights(scores[:, None].expand(b, nw, r, n), num_tokens, score_mask)
        selected, indices = weights.topk(num_tokens, dim=-1)  # [b, nw, r, k]
        if self.straight_through:
            selected = selected + (1.0 - selected).detach()
        routed_mask = score_mask.gather(-1, indices)
        selected = selected * routed_mask
        routed = gather_tokens(x, indices)  # [b, nw, r, k, d]
        return RouterReturn(
            indices.reshape(b * nw, r, -1),
            selected.reshape(b * nw, r, -1),
            routed.reshape(b * nw, r, num_tokens, d),
            routed_mask.reshape(b * nw, r, -1),
        )

    def forward(
        self,
        x: Tensor,
        *,
        num_tokens: int,
        mask: Tensor | None = None,
        random_route: bool = False,
        routing_tokens: Tensor | None = None,
        keep_one_route_dim: bool = False,
    ) -> RouterReturn:
        """Route ``x [b, n, d]``; ``mask [b, n]`` is ``True`` for real tokens. With
        ``learned_routing_tokens`` pass ``routing_tokens [b, r, d]``."""
        check_tokens(x, self.dim)
        check_token_mask(mask, x)
        check_backend(self.backend, x)
        b, n, d = x.shape
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
            raise TypeError(f"num_tokens must be an int, got {type(num_tokens).__name__}")
        if routing_tokens is not None and self.learned_routing_tokens:
            rt = routing_tokens
            if not isinstance(rt, Tensor) or rt.ndim != 3 or rt.shape[-1] != d:
                raise ValueError(f"routing_tokens must be [batch, routes, {d}]")
            blocks = 1 if self.route_block_size is None else -(-n // self.route_block_size)
            if rt.shape[0] not in (b, b * blocks) or rt.device != x.device:
                raise ValueError(
                    f"routing_tokens must have batch {b} and be on {x.device}, got "
                    f"{tuple(rt.shape)} on {rt.device}"
                )
        block_size = self.route_block_size
        if block_size is not None:
            w = block_size
            pad = (-n) % w
            if pad:
                x = F.pad(x, (0, 0, 0, pad))
                mask = F.pad(
                    mask if mask is not None else x.new_ones(b, n, dtype=torch.bool),
                    (0, pad),
                    value=False,
                )
            nb = x.shape[1] // w
            x = x.reshape(b * nb, w, d)
            mask = None if mask is None else mask.reshape(b * nb, w)
        seq = x.shape[1]
        if not 0 < num_tokens <= seq:
            raise ValueError(f"num_tokens must be in [1, {seq}], got {num_tokens}")

        scores = self._scores(x, routing_tokens, x.shape[0])
        r = scores.shape[1]
        if random_route:
            scores = torch.randn_like(scores)
        score_mask = None if mask is None else mask.unsqueeze(1).expand(-1, r, -1)
        weights = self._weights(scores, num_tokens, score_mask)
        selected, indices = weights.topk(num_tokens, dim=-1)
        if self.straight_through:
            selected = selected + (1.0 - selected).detach()
        routed = gather_tokens(x, indices)  # [B, r, k, d]
        routed_mask = None if score_mask is None else score_mask.gather(-1, indices)
        if block_size is not None:
            nb = x.shape[0] // b
            offsets = torch.arange(nb, device=x.device).view(1, nb, 1, 1) * block_size
            indices = (indices.view(b, nb, r, num_tokens) + offsets).permute(0, 2, 1, 3)
            indices = indices.reshape(b, r, nb * num_tokens)
            selected = selected.view(b, nb, r, num_tokens).permute(0, 2, 1, 3).reshape(b, r, -1)
            routed = routed.view(b, nb, r, num_tokens, d).permute(0, 2, 1, 3, 4)
            routed = routed.reshape(b, r, nb * num_tokens, d)
            if routed_mask is not None:
                routed_mask = routed_mask.view(b, nb, r, num_tokens).permute(0, 2, 1, 3)
                routed_mask = routed_mask.reshape(b, r, -1)
        if routed_mask is not None:
            selected = selected * routed_mask  # padding / masked picks carry no weight
        if r == 1 and not keep_one_route_dim:
            indices, selected, routed = indices[:, 0], selected[:, 0], routed[:, 0]
            routed_mask = None if routed_mask is None else routed_mask[:, 0]
        return RouterReturn(indices, selected, routed, routed_mask)
