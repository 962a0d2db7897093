"""Coordinate descent for a differentiable top-k (reference path in plain PyTorch).

Solves the entropy-regularised top-k relaxation of CoLT5 (Ainslie et al. 2023) by coordinate
descent on its dual (Wright 2015) with epsilon scaling: ``eps`` starts at ``eps_init`` and is
multiplied by ``eps_decay`` after each iteration, never below ``eps``.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["TopkReturn", "coor_descent", "coor_descent_reference", "eps_schedule", "topk"]


def eps_schedule(n_iters: int, eps: float, eps_init: float | None, eps_decay: float) -> list[float]:
    """The ``n_iters + 1`` epsilons: one per iteration, then the one of the final scores."""
    if isinstance(n_iters, bool) or not isinstance(n_iters, int):
        raise TypeError(f"n_iters must be an int, got {type(n_iters).__name__}")
    if n_iters <= 0:
        raise ValueError(f"n_iters must be positive, got {n_iters}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be positive and finite, got {eps}")
    if eps_init is not None and not math.isfinite(eps_init):
        raise ValueError(f"eps_init must be finite, got {eps_init}")
    if not 0 < eps_decay <= 1:
        raise ValueError(f"eps_decay must be in (0, 1], got {eps_decay}")
    current = max(eps if eps_init is None else eps_init, eps)
    out = []
    for _ in range(n_iters + 1):
        out.append(current)
        current = max(current * eps_decay, eps)
    return out


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype coordinate descent runs in: float64 stays float64, everything else is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_mask(mask: Tensor | None, s: Tensor) -> Tensor | None:
    """Validate a boolean ``mask`` against ``s [..., n]``; returns it broadcast to ``s.shape``."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a boolean tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be boolean (True = keep), got {mask.dtype}; use mask.bool()")
    if mask.device != s.device:
        raise ValueError(f"mask is on {mask.device}, s on {s.device}")
    if mask.shape != s.shape:
        fits = mask.ndim <= s.ndim and all(
            m in (1, n) for m, n in zip(reversed(mask.shape), reversed(s.shape))
        )
        if not fits:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not broadcast to s shape {tuple(s.shape)}"
            )
        mask = mask.expand(s.shape)
    return mask


def check_scores(s: Tensor) -> None:
    """Raise a clear error unless ``s`` is a floating point tensor ``[..., n]``."""
    if not isinstance(s, Tensor):
        raise TypeError(f"s must be a tensor, got {type(s).__name__}")
    if not s.is_floating_point():
        raise TypeError(f"s must be a floating point tensor, got {s.dtype}")
    if s.ndim < 1:
        raise ValueError("s must have at least one dimension [..., n], got a scalar")


def check_inputs(
    s: Tensor, k: float | Tensor, mask: Tensor | None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Validate ``s [..., n]``, ``k``, ``mask [..., n]``; return ``k`` as a ``[..., 1]`` tensor of
    ``dtype``. Value checks of a tensor ``k`` are skipped on meta tensors and under
    ``torch.compile`` (they read the tensor back)."""
    check_scores(s)
    check_mask(mask, s)
    if isinstance(k, Tensor):
        if k.is_complex() or k.dtype == torch.bool:
            raise TypeError(f"k must be a real number tensor, got {k.dtype}")
        if k.numel() == 1:
            k = k.reshape(())
        elif k.shape != s.shape[:-1]:
            raise ValueError(
                f"k must be a scalar or of shape {tuple(s.shape[:-1])}, got {tuple(k.shape)}"
            )
        kt = k.detach().to(device=s.device, dtype=dtype).expand(s.shape[:-1])
        if (
            kt.numel() > 0
            and kt.device.type != "meta"
            and not torch.compiler.is_compiling()
            and not bool(((kt > 0) & torch.isfinite(kt)).all())
        ):
            raise ValueError("k must be positive and finite")
    else:
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise TypeError(f"k must be a number or a tensor, got {type(k).__name__}")
        if not (k > 0 and math.isfinite(k)):
            raise ValueError(f"k must be positive and finite, got {k}")
        kt = torch.full(s.shape[:-1], float(k), device=s.device, dtype=dtype)
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
        mask: boolean ``[..., n]`` (or broadcastable to it), ``True`` = keep; masked entries get
            weight 0 and no gradient.

    Returns:
        weights ``[..., n]`` in ``[0, 1]`` with each row summing to about ``k``; dtype of ``s``.
        float64 scores are computed in float64, all other dtypes in float32.

    Non-finite scores: ``-inf`` entries are treated as masked (weight 0), ``+inf`` entries get
    weight 1 (gradient 0), a NaN makes its row NaN (masked entries stay 0).
    """
    epsilons = eps_schedule(n_iters, eps, eps_init, eps_decay)
    cdt = compute_dtype(s.dtype)
    logk = check_inputs(s, k, mask, cdt).log()
    mask = check_mask(mask, s)
    if s.numel() == 0:
        return s * 0
    x = s.to(cdt)
    valid = x != float("-inf")  # NaN stays valid, so it propagates
    if mask is not None:
        valid = valid & mask
    x = x.masked_fill(~valid, 0.0)
    has_any = valid.any(-1, keepdim=True)
    neg = torch.finfo(cdt).min
    a = torch.zeros_like(x[..., :1])
    for it in range(n_iters):
        # w = x + b with b = -relu(x + a) (b = -x before the first iteration): min(x, -a), with
        # the gradient of the relu form at ties and no inf - inf for infinite scores
        w = torch.zeros_like(x) if it == 0 else torch.where(x + a > 0, -a, x)
        z = (w / epsilons[it]).masked_fill(~valid, neg)
        a = epsilons[it] * (logk - z.logsumexp(dim=-1, keepdim=True))
        a = torch.where(has_any, a, torch.zeros_like(a))  # fully masked rows: keep a finite
    # a NaN score makes its whole row NaN (also after a single iteration), as in the kernels
    a = torch.where(torch.isnan(x).any(-1, keepdim=True), torch.full_like(a, float("nan")), a)
    u = x + a
    out = (torch.where(u > 0, torch.zeros_like(u), u) / epsilons[n_iters]).exp()
    out = out.masked_fill(~valid, 0.0)
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

    Shapes as in :func:`coor_descent_reference`. ``backend`` is ``"reference"``, ``"triton"``
    (raises for inputs the kernels cannot take), ``"auto-triton"`` (Triton where it can run:
    CUDA, or CPU under ``TRITON_INTERPRET=1``) or ``None`` (Triton for CUDA tensors). The
    automatic choices fall back to the reference for float64 (kept in float64) and meta tensors.
    ``checkpoint_segments`` is accepted for upstream compatibility: the Triton
    path saves only two scalars per row and iteration and recomputes the rest in its backward.
    """
    check_scores(s)
    if backend not in (None, "auto-triton", "reference", "triton"):
        raise ValueError(
            f"backend must be 'reference', 'triton', 'auto-triton' or None, got {backend!r}"
        )
    if backend is None or backend == "auto-triton":
        # Triton where it can run (CUDA, or CPU tensors under the interpreter for "auto-triton")
        # and in a dtype it handles; float64, meta tensors and other devices use the reference
        from .coor_descent_triton import triton_supports

        runs = s.is_cuda or (backend == "auto-triton" and os.environ.get("TRITON_INTERPRET") == "1")
        backend = "triton" if runs and triton_supports(s) else "reference"
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
    raise AssertionError("unreachable")  # pragma: no cover


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
    ``TRITON_INTERPRET=1``) and the reference elsewhere. ``mask [..., n]`` (``True`` = keep)
    ranks masked entries last, also with ``non_differentiable``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating point tensor, got {x.dtype}")
    if x.ndim < 1:
        raise ValueError("x must have at least one dimension [..., n], got a scalar")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 0 < k <= x.shape[-1]:
        raise ValueError(f"k must be in [1, {x.shape[-1]}], got {k}")
    mask = check_mask(mask, x)
    if non_differentiable:
        ranked = x if mask is None else x.masked_fill(~mask, float("-inf"))
        indices = ranked.topk(k, dim=-1).indices
        return TopkReturn(x.gather(-1, indices), indices, None, None)
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
