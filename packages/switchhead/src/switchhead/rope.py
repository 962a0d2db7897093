"""Rotary position embedding on the first ``n_rotate`` channels of each head.

The rotation is written as one permutation and two multiplies,
``y = x * C + x[..., perm] * S``, with ``C``/``S`` tables that are the identity on the channels
that are not rotated, so it works for any head size, padded heads included. Its backward is the
inverse rotation. One op, three paths: PyTorch reference, a one-pass Triton kernel (CUDA, or CPU
under ``TRITON_INTERPRET=1``) and the ``switchhead::rotate`` custom op (fake + autograd) that
``torch.compile`` traces.
"""

from __future__ import annotations

import math
import os

import torch


def _rotate_reference(x, cos, sin, perm):
    """``x [M, G, D]`` (row ``m`` at table row ``m % T``), ``cos/sin [T, D]``."""
    n_pos = cos.shape[0]
    x4 = x.reshape(-1, n_pos, *x.shape[1:])
    y = torch.addcmul(x4 * cos[:, None], x4.index_select(-1, perm), sin[:, None])
    return y.reshape(x.shape)


@torch.library.custom_op("switchhead::rotate", mutates_args=())
def _rotate(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    perm: torch.Tensor,
    sin_inv: torch.Tensor,
    inv_perm: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    """``y = x * cos + x[..., perm] * sin``; ``sin_inv = sin[..., inv_perm]`` and ``inv_perm``
    serve the backward (the inverse rotation)."""
    if backend == "triton":
        from .rope_triton import rotate

        return rotate(x, cos, sin, perm)
    return _rotate_reference(x, cos, sin, perm).contiguous()


@_rotate.register_fake
def _(x, cos, sin, perm, sin_inv, inv_perm, backend):
    return x.new_empty(x.shape)


def _rotate_setup(ctx, inputs, output):
    _, cos, sin, perm, sin_inv, inv_perm, backend = inputs
    ctx.save_for_backward(cos, sin, perm, sin_inv, inv_perm)
    ctx.backend = backend


def _rotate_backward(ctx, grad):
    # The transpose of y = x * C + x[perm] * S is g * C + (g * S)[inv] = g * C + g[inv] * S[inv].
    cos, sin, perm, sin_inv, inv_perm = ctx.saved_tensors
    grad_x = _rotate(grad, cos, sin_inv, inv_perm, sin, perm, ctx.backend)
    return grad_x, None, None, None, None, None, None


_rotate.register_autograd(_rotate_backward, setup_context=_rotate_setup)


class RotaryEmbedding(torch.nn.Module):
    """RoPE with the "rotate half" pairing (channel ``c`` with ``c + n_rotate/2``).

    Args:
        n_rotate: rotated channels per head (even; the others pass through unchanged).
        base: frequency base (channel pair ``c`` turns by ``position * base**(-2c/n_rotate)``).
        head_size: channels per head (``>= n_rotate``; default ``n_rotate``).
    """

    def __init__(self, n_rotate: int, base: float = 10000.0, head_size: int | None = None):
        super().__init__()
        self.backend: str | None = None  # "reference" | "triton"; None: Triton on CUDA
        head_size = n_rotate if head_size is None else head_size
        if n_rotate % 2 or n_rotate < 0:
            raise ValueError(f"n_rotate must be even and >= 0, got {n_rotate}")
        if head_size < n_rotate:
            raise ValueError(f"head_size {head_size} < n_rotate {n_rotate}")
        self.n_rotate = n_rotate
        self.head_size = head_size
        self.base = base
        half = n_rotate // 2
        perm = list(range(half, n_rotate)) + list(range(half)) + list(range(n_rotate, head_size))
        inv = [0] * head_size
        for i, p in enumerate(perm):
            inv[p] = i
        self.register_buffer("perm", torch.tensor(perm), persistent=False)
        self.register_buffer("inv_perm", torch.tensor(inv), persistent=False)
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _cos_sin(self, end: int, device: torch.device, dtype: torch.dtype):
        """``C, S, S[:, inv_perm]`` (``[L, head_size]``) for positions ``0..L-1`` with
        ``L >= end`` (``S`` carries the sign of the rotation), computed in float32 (float64 for
        float64), cached per device and dtype and grown by doubling (not while compiling)."""
        key = (device, dtype)
        cached = self._tables.get(key)
        compiling = torch.compiler.is_compiling()
        if cached is not None and cached[0].shape[0] >= end and not compiling:
            return cached
        length = max(end, 2 * cached[0].shape[0] if cached is not None else 0)
        work = torch.float64 if dtype == torch.float64 else torch.float32
        channels = torch.arange(0, self.n_rotate, 2, device=device, dtype=work)
        inv_freq = self.base ** (-channels / self.n_rotate)
        angles = torch.outer(torch.arange(length, device=device, dtype=work), inv_freq)
        n_rest = self.head_size - self.n_rotate
        ones = torch.ones(length, n_rest, device=device, dtype=work)
        cos = torch.cat([angles.cos(), angles.cos(), ones], dim=-1)
        sin = torch.cat([-angles.sin(), angles.sin(), ones * 0], dim=-1)
        tables = (cos.to(dtype), sin.to(dtype), sin.to(dtype)[:, self.inv_perm.to(device)])
        if not compiling:
            self._tables[key] = tables
        return tables

    def forward(self, x: torch.Tensor, offset: int = 0, seq_dim: int = -2) -> torch.Tensor:
        """Rotate ``x [..., head_size]`` whose index ``t`` along ``seq_dim`` is at position
        ``offset + t`` (``seq_dim`` counts from the front or, negative, from the back)."""
        if x.shape[-1] != self.head_size:
            raise ValueError(f"expected {self.head_size} channels, got {x.shape[-1]}")
        if self.n_rotate == 0:
            return x
        seq_dim = seq_dim % x.dim()
        n = x.shape[seq_dim]
        cos, sin, sin_inv = (
            t[offset : offset + n] for t in self._cos_sin(offset + n, x.device, x.dtype)
        )
        flat = x.reshape(math.prod(x.shape[: seq_dim + 1]), -1, self.head_size)
        backend = _backend(x.device, self.backend)
        perm, inv_perm = self.perm.to(x.device), self.inv_perm.to(x.device)
        return _rotate(flat, cos, sin, perm, sin_inv, inv_perm, backend).view(x.shape)


def _backend(device: torch.device, backend: str | None) -> str:
    if backend is None:
        if device.type != "cuda":
            return "reference"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "reference"
        return "triton"
    if backend not in ("reference", "triton"):
        raise ValueError(f"unknown backend {backend!r}; use 'reference' or 'triton'")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 "
            "before importing triton to run the kernels on the CPU"
        )
    return backend
