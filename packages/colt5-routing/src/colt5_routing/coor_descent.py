"""Coordinate descent for a differentiable top-k (reference path in plain PyTorch).

Solves the entropy-regularised top-k relaxation of CoLT5 (Ainslie et al. 2023) by coordinate
descent on its dual (Wright 2015) with epsilon scaling: ``eps`` starts at ``eps_init`` and is
multiplied by ``eps_decay`` after each iteration, never below ``eps``.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["TopkReturn", "coor_descent", "coor_descent_reference", "eps_schedule", "topk"]


def eps_schedule(n_iters: int, eps: float, eps_init: float | None, eps_decay: float) -> list[float]:
    """The ``n_iters + 1`` epsilons: one per iteration, then the one of the final scores."""
    if n_iters <= 0:
        raise ValueError(f"n_iters must be positive, got {n_iters}")
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if not 0 < eps_decay <= 1:
        raise ValueError(f"eps_decay must be in (0, 1], got {eps_decay}")
    current = max(eps if eps_init is None else eps_init, eps)
    out = []
    for _ in range(n_iters + 1):
        out.append(current)
        current = max(current * eps_decay, eps)
    return out


def check_inputs(s: Tensor, k: float | Tensor, mask: Tensor | None) -> Tensor:
    """Validate ``s [..., n]``, ``k``, ``mask [..., n]``; return ``k`` as a ``[..., 1]`` tensor."""
    if s.ndim < 1 or s.shape[-1] == 0:
        raise ValueError(f"s must have a non-empty last dimension, got shape {tuple(s.shape)}")
    if not s.is_floating_point():
        raise TypeError(f"s must be a floating point tensor, got {s.dtype}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be boolean (True = keep), got {mask.dtype}")
        if mask.shape != s.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != s shape {tuple(s.shape)}")
        if mask.device != s.device:
            raise ValueError(f"mask is on {mask.device}, s on {s.device}")
    if isinstance(k, Tensor):
        if k.shape != s.shape[:-1] and k.numel() != 1:
            raise ValueError(f"k must be a scalar or of shape {tuple(s.shape[:-1])}, got {k.shape}")
        kt = k.detach().to(device=s.device, dtype=torch.float32)
        kt = kt.expand(s.shape[:-1]) if kt.numel() == 1 else kt
        if s.numel() > 0 and not torch.compiler.is_compiling() and bool((kt <= 0).any()):
            raise ValueError("k must be positive")
    else:
        if not k > 0:
            raise ValueError(f"k must be positive, got {k}")
        kt = torch.full(s.shape[:-1], float(k), device=s.device, dtype=torch.float32)
    return kt.unsqueeze(-1)


def coor_descent_reference(
    s: Tensor,
    *,
    n_iters: int,
    k: float | Tensor,
    eps: float = 0.1,
    eps_init: float | None = None,
    eps_decay: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Reference coordinate descent; differentiable by autograd.

    Args:
        s: scores ``[..., n]``.
        k: how many entries each row selects (a number or a ``[...]`` tensor of per-row values).
        mask: boolean ``[..., n]``, ``True`` = keep; masked entries get weight 0 and no gradient.

    Returns:
        weights ``[..., n]`` in ``[0, 1]`` with each row summing to about ``k``; dtype of ``s``.
    """
    epsilons = eps_schedule(n_iters, eps, eps_init, eps_decay)
    logk = check_inputs(s, k, mask).log()
    x = s.float()
    neg = torch.finfo(torch.float32).min
    if mask is not None:
        x = x.masked_fill(~mask, 0.0)
    b = -x
    a = torch.zeros_like(x[..., :1])
    for it in range(n_iters):
        z = (x + b) / epsilons[it]
        if mask is not None:
            z = z.masked_fill(~mask, neg)
        a = epsilons[it] * (logk - z.logsumexp(dim=-1, keepdim=True))
        if mask is not None:  # fully masked rows: keep a finite
            a = torch.where(mask.any(-1, keepdim=True), a, torch.zeros_like(a))
        b = -torch.relu(x + a)
    out = ((x + a + b) / epsilons[n_iters]).exp()
    if mask is not None:
        out = out.masked_fill(~mask, 0.0)
    return out.to(s.dtype)


def coor_descent(
    s: Tensor,
    *,
    n_iters: int,
    k: float | Tensor,
    eps: float = 0.1,
    eps_init: float | None = None,
    eps_decay: float = 1.0,
    mask: Tensor | None = None,
    backend: str | None = None,
    checkpoint_segments: int = 1,
) -> Tensor:
    """Differentiable coordinate descent; dispatches CUDA tensors to Triton, else the reference.

    Shapes as in :func:`coor_descent_reference`. ``backend`` is ``"reference"``, ``"triton"``,
    ``"auto-triton"`` (Triton where it can run) or ``None`` (by device).
    ``checkpoint_segments`` is accepted for upstream compatibility: the Triton
    path saves only two scalars per row and iteration and recomputes the rest in its backward.
    """
    if backend is None:
        backend = "triton" if s.is_cuda else "reference"
    elif backend == "auto-triton":  # Triton where it can run (CUDA or interpreter), else reference
        backend = (
            "triton" if s.is_cuda or os.environ.get("TRITON_INTERPRET") == "1" else "reference"
        )
    if backend == "reference":
        return coor_descent_reference(
            s, n_iters=n_iters, k=k, eps=eps, eps_init=eps_init, eps_decay=eps_decay, mask=mask
        )
    if backend == "triton":
        from .coor_descent_triton import triton_coor_descent

        return triton_coor_descent(
            s,
            n_iters=n_iters,
            k=k,
            eps=eps,
            eps_init=eps_init,
            eps_decay=eps_decay,
            mask=mask,
            checkpoint_segments=checkpoint_segments,
        )
    raise ValueError(f"backend must be 'reference', 'triton' or None, got {backend!r}")


class TopkReturn(NamedTuple):
    """``values`` (straight-through gated inputs), ``indices``, the coordinate-descent weights
    of the selected entries and the straight-through ``gates`` (1 forward), all ``[..., k]``."""

    values: Tensor
    indices: Tensor
    coor_descent_values: Tensor | None
    gates: Tensor | None


def topk(
    x: Tensor,
    k: int,
    coor_descent_k_ratio: float = 9 / 8,
    n_iters: int = 20,
    eps: float = 0.1,
    eps_init: float | None = None,
    eps_decay: float = 1.0,
    mask: Tensor | None = None,
    fused: bool = False,
    non_differentiable: bool = False,
) -> TopkReturn:
    """Differentiable top-k of ``x [..., n]`` along the last dimension.

    Coordinate descent runs with ``k * coor_descent_k_ratio`` (CoLT5 uses 9/8), then the ``k``
    largest weights are kept; ``gates`` are 1 in the forward pass and carry the weights' gradient.
    ``fused=True`` uses the Triton kernels where they run (CUDA, or CPU under
    ``TRITON_INTERPRET=1``) and the reference elsewhere.
    """
    if not 0 < k <= x.shape[-1]:
        raise ValueError(f"k must be in [1, {x.shape[-1]}], got {k}")
    if non_differentiable:
        values, indices = x.topk(k, dim=-1)
        return TopkReturn(values, indices, None, None)
    if coor_descent_k_ratio < 1:
        raise ValueError(f"coor_descent_k_ratio must be >= 1, got {coor_descent_k_ratio}")
    cd_k = min(k * coor_descent_k_ratio, x.shape[-1])
    scores = coor_descent(
        x,
        n_iters=n_iters,
        k=cd_k,
        eps=eps,
        eps_init=eps_init,
        eps_decay=eps_decay,
        mask=mask,
        backend="auto-triton" if fused else "reference",
    )
    cd_values, indices = scores.topk(k, dim=-1)
    gates = cd_values + (1.0 - cd_values).detach()
    values = x.gather(-1, indices) * gates
    return TopkReturn(values, indices, cd_values, gates)
