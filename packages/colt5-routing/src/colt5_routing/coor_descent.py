"""Coordinate descent for a differentiable top-k (reference path in plain PyTorch).

Solves the entropy-regularised top-k relaxation of CoLT5 (Ainslie et al. 2023) by coordinate
descent on its dual (Wright 2015) with epsilon scaling: ``eps`` starts at ``eps_init`` and is
multiplied by ``eps_decay`` after each iteration, never below ``eps``.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["TopkReturn", "coor_descent", "coor_descent_reference", "eps_schedule", "topk"]

# the release that removes the deprecated spellings of ``backend``
ALIASES_REMOVED_IN = "0.3"


class _AliasBackend(str):
    """A backend that only a deprecated spelling names (see :data:`AUTO_TRITON`). Routers and
    blocks hand it on to the routers they build without warning again; a ``backend=`` string
    from the user is never one (``backend="auto-triton"`` is taken by :func:`coor_descent`
    alone, with a warning)."""


# What coor_descent(backend="auto-triton"), topk(fused=True) and use_triton=True did: Triton
# where it can run (CUDA tensors, and CPU tensors under TRITON_INTERPRET=1) and in a dtype it
# takes, else the reference. No new spelling says this: None runs the reference on CPU even under
# the interpreter, "triton" raises where Triton cannot run. It goes with the aliases.
AUTO_TRITON = _AliasBackend("auto-triton")


def check_backend_name(backend: object) -> None:
    """Raise ``ValueError`` unless ``backend`` is ``None``, ``"reference"`` or ``"triton"`` (or
    the value of a deprecated spelling, :data:`AUTO_TRITON`)."""
    if backend is None or isinstance(backend, _AliasBackend) or backend in ("reference", "triton"):
        return
    raise ValueError(f"backend must be None, 'reference' or 'triton', got {backend!r}")


def backend_with_alias(
    backend: str | None,
    alias: str | None,
    alias_backend: str | None,
    *,
    stacklevel: int = 3,
) -> str | None:
    """``backend`` checked, with a deprecated spelling of it folded in: ``alias`` (as the user
    wrote it, e.g. ``"use_triton=True"``; ``None`` when not given) means ``alias_backend``.
    The alias warns (one ``FutureWarning`` naming the replacement) and gives ``alias_backend``;
    together with a ``backend`` other than ``None`` it must mean the same, else ``ValueError``.
    ``stacklevel`` is :func:`warnings.warn`'s, counted from here (3: the caller's caller)."""
    check_backend_name(backend)
    if alias is None:
        return backend
    if backend is not None and backend != alias_backend:
        raise ValueError(
            f"{alias} (deprecated) and backend={backend!r} disagree; pass backend= alone"
        )
    if alias_backend == "reference":
        replacement = "backend='reference'"
    else:
        replacement = (
            "backend=None (the same for CUDA tensors; CPU tensors get the reference, also under "
            "TRITON_INTERPRET=1) or backend='triton' (Triton only: CUDA tensors, or CPU tensors "
            "under TRITON_INTERPRET=1; raises where Triton cannot run)"
        )
    warnings.warn(
        f"{alias} is deprecated and goes away in colt5-routing {ALIASES_REMOVED_IN}; use "
        f"{replacement}",
        FutureWarning,
        stacklevel=stacklevel,
    )
    return alias_backend


def use_triton_backend(
    backend: str | None, use_triton: bool | None, *, stacklevel: int = 4
) -> str | None:
    """The backend of a router or block from its ``backend`` and deprecated ``use_triton``
    arguments: ``use_triton=False`` is ``backend="reference"``, ``use_triton=True`` is
    :data:`AUTO_TRITON`, ``None`` (the default) says nothing. See :func:`backend_with_alias`."""
    if use_triton is None:
        return backend_with_alias(backend, None, None)
    alias_backend = AUTO_TRITON if use_triton else "reference"
    return backend_with_alias(
        backend, f"use_triton={use_triton!r}", alias_backend, stacklevel=stacklevel
    )


def check_backend(backend: str | None, x: Tensor) -> None:
    """Raise before anything runs where ``backend`` cannot run on tensors like ``x`` (only
    ``"triton"`` can fail): ``RuntimeError`` without the ``triton`` package, ``TypeError`` for
    dtypes the kernels do not take (float64: use ``None`` or ``"reference"``, which keep it in
    float64), ``ValueError`` for devices other than CUDA (CPU runs the kernels only under
    ``TRITON_INTERPRET=1``; meta tensors pass, they get shapes). Invalid names raise
    ``ValueError``."""
    check_backend_name(backend)
    if backend != "triton" or isinstance(backend, _AliasBackend):
        return
    from .coor_descent_triton import HAS_TRITON, KERNEL_DTYPES, triton_supports

    if triton_supports(x):
        return
    if not HAS_TRITON:
        raise RuntimeError(
            "backend='triton' needs the triton package, which is not installed; use "
            "backend=None or backend='reference'"
        )
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"backend='triton' takes fp32/fp16/bf16 tensors, got {x.dtype}; use backend=None or "
            "backend='reference' (float64 is computed in float64 there)"
        )
    if x.device.type != "meta":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
            f"before triton is imported), got a tensor on {x.device}; use backend=None or "
            "backend='reference'"
        )


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


def _check_rows(t: Tensor, name: str) -> None:
    """Raise a clear error, naming ``t`` as ``name``, unless it is a floating point tensor
    ``[..., n]`` (the scores of :func:`coor_descent` and the input of :func:`topk`)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {t.dtype}")
    if t.ndim < 1:
        raise ValueError(f"{name} must have at least one dimension [..., n], got a scalar")


def check_scores(s: Tensor) -> None:
    """Raise a clear error unless ``s`` is a floating point tensor ``[..., n]``."""
    _check_rows(s, "s")


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

    Shapes as in :func:`coor_descent_reference`. ``backend``: ``None`` (Triton for CUDA tensors
    when Triton imports and takes the dtype, else the reference: float64 stays float64 there,
    meta tensors get shapes), ``"reference"``, or ``"triton"`` (CUDA tensors, or CPU tensors
    under ``TRITON_INTERPRET=1``; raises before any kernel runs where Triton cannot run, see
    :func:`check_backend`). ``"auto-triton"`` is a deprecated alias (``FutureWarning``, until
    0.3): Triton where it can run, the interpreter on CPU included, else the reference.
    ``checkpoint_segments`` is accepted for upstream compatibility: the Triton
    path saves only two scalars per row and iteration and recomputes the rest in its backward.
    """
    if type(backend) is str and backend == "auto-triton":
        backend = backend_with_alias(None, "backend='auto-triton'", AUTO_TRITON)
    return _coor_descent(
        s,
        n_iters=n_iters,
        k=k,
        eps=eps,
        eps_init=eps_init,
        eps_decay=eps_decay,
        mask=mask,
        backend=backend,
        checkpoint_segments=checkpoint_segments,
    )


def _coor_descent(
    s: Tensor,
    *,
    n_iters: int,
    k: float | Tensor,
    eps: float,
    eps_init: float | None,
    eps_decay: float,
    mask: Tensor | None,
    backend: str | None,
    checkpoint_segments: int = 1,
) -> Tensor:
    """:func:`coor_descent` once deprecated spellings are resolved (takes :data:`AUTO_TRITON`
    without warning: the router and ``topk`` warned where the user spelled it)."""
    check_scores(s)
    check_backend(backend, s)
    if backend is None or isinstance(backend, _AliasBackend):
        # Triton where it can run (CUDA; CPU tensors under the interpreter for the deprecated
        # AUTO_TRITON) and in a dtype it handles; float64, meta tensors and other devices use
        # the reference
        from .coor_descent_triton import _interpreting, triton_supports

        runs = s.is_cuda or (backend is not None and _interpreting())
        backend = "triton" if runs and triton_supports(s) else "reference"
    if backend == "reference":
        return coor_descent_reference(
            s, n_iters=n_iters, k=k, eps=eps, eps_init=eps_init, eps_decay=eps_decay, mask=mask
        )
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
    fused: bool | None = None,
    non_differentiable: bool = False,
    *,
    backend: str | None = None,
) -> TopkReturn:
    """Differentiable top-k of ``x [..., n]`` along the last dimension.

    Coordinate descent runs with ``k * coor_descent_k_ratio`` (CoLT5 uses 9/8), then the ``k``
    largest weights are kept; ``gates`` are 1 in the forward pass and carry the weights' gradient.
    ``backend`` is the coordinate descent's, as in :func:`coor_descent` (``None``: Triton for
    CUDA tensors, else the reference); ``non_differentiable`` runs no coordinate descent and
    only checks its name. ``fused`` is deprecated (``FutureWarning``, until 0.3):
    ``fused=False`` is ``backend="reference"``; ``fused=True`` runs Triton where it can (CUDA,
    or CPU under ``TRITON_INTERPRET=1``) and the reference elsewhere. ``mask [..., n]``
    (``True`` = keep) ranks masked entries last, also with ``non_differentiable``.
    """
    alias = None if fused is None else f"fused={fused!r}"
    backend = backend_with_alias(backend, alias, AUTO_TRITON if fused else "reference")
    _check_rows(x, "x")
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
    scores = _coor_descent(
        x,
        n_iters=n_iters,
        k=cd_k,
        eps=eps,
        eps_init=eps_init,
        eps_decay=eps_decay,
        mask=mask,
        backend=backend,
    )
    cd_values, indices = scores.topk(k, dim=-1)
    gates = cd_values + (1.0 - cd_values).detach()
    values = x.gather(-1, indices) * gates
    return TopkReturn(values, indices, cd_values, gates)
