"""Rotary position embedding on the first ``n_rotate`` channels of each head.

The rotation is written as one permutation and two multiplies,
``y = x * C + x[..., perm] * S``, with ``C``/``S`` tables that are the identity on the channels
that are not rotated, so it works for any head size, padded heads included. Its backward is the
inverse rotation (three kernels), not autograd's slice/cat bookkeeping. On CUDA (outside
``torch.compile``, whose Inductor fuses the three) each way is one Triton pass
(:mod:`switchhead.rope_triton`).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .triton_support import kernels_can_run


class _Rotate(torch.autograd.Function):
    """``y = x * cos + x[..., perm] * sin``; backward ``g * cos + (g * sin)[..., inv_perm]``."""

    @staticmethod
    def forward(ctx, x, cos, sin, perm, inv_perm):
        ctx.save_for_backward(cos, sin, inv_perm)
        return torch.addcmul(x * cos, x.index_select(-1, perm), sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin, inv_perm = ctx.saved_tensors
        grad_x = torch.addcmul(grad * cos, grad.index_select(-1, inv_perm), sin[..., inv_perm])
        return grad_x, None, None, None, None


class _RotateTriton(torch.autograd.Function):
    """:class:`_Rotate` as one kernel each way; ``x [outer, T, inner, hs]``."""

    @staticmethod
    def forward(ctx, x, cos, sin, offset, n_rotate):
        from .rope_triton import rotate

        ctx.save_for_backward(cos, sin)
        ctx.settings = (offset, n_rotate)
        return rotate(x, cos, sin, offset, n_rotate, inverse=False)

    @staticmethod
    @once_differentiable  # the backward kernel records no graph: no silent second derivative
    def backward(ctx, grad):
        from .rope_triton import rotate

        cos, sin = ctx.saved_tensors
        offset, n_rotate = ctx.settings
        grad4 = grad if grad.stride(-1) == 1 else grad.contiguous()
        return rotate(grad4, cos, sin, offset, n_rotate, inverse=True), None, None, None, None


def _kernel_view(x: torch.Tensor, seq_dim: int, backend: str | None) -> torch.Tensor | None:
    """``x`` as ``[outer, T, inner, hs]`` without a copy where the Triton kernel runs for it,
    else ``None``: ``backend=None`` on CUDA, ``"triton"`` also on CPU under
    ``TRITON_INTERPRET=1``; 16/32-bit floats; not while compiling."""
    if backend == "reference" or torch.compiler.is_compiling() or x.stride(-1) != 1:
        return None
    if not kernels_can_run(x) or (backend is None and x.device.type != "cuda"):
        return None
    shape = x.shape
    try:
        return x.view(shape[:seq_dim].numel(), shape[seq_dim], shape[seq_dim + 1 : -1].numel(), -1)
    except RuntimeError:  # dims that do not merge
        return None


class RotaryEmbedding(torch.nn.Module):
    """RoPE with the "rotate half" pairing (channel ``c`` with ``c + n_rotate/2``).

    Args:
        n_rotate: rotated channels per head (even; the others pass through unchanged).
        base: frequency base (channel pair ``c`` turns by ``position * base**(-2c/n_rotate)``).
        head_size: channels per head (``>= n_rotate``; default ``n_rotate``).
        backend: ``None`` (a Triton pass each way on CUDA, PyTorch ops elsewhere),
            ``"reference"`` (PyTorch ops) or ``"triton"`` (also on CPU under
            ``TRITON_INTERPRET=1``; PyTorch ops where the kernel does not take the input).
    """

    perm: torch.Tensor  # buffers (registered in __init__)
    inv_perm: torch.Tensor

    def __init__(
        self,
        n_rotate: int,
        base: float = 10000.0,
        head_size: int | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        if backend not in (None, "reference", "triton"):
            raise ValueError(f"backend must be None, 'reference' or 'triton', got {backend!r}")
        self.backend = backend
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
        """``C, S [L, head_size]`` for positions ``0..L-1`` with ``L >= end`` (``S`` carries the
        sign of the rotation), computed in float32 (float64 for float64), cached per device and
        dtype and grown by doubling (not cached while compiling)."""
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
        tables = (cos.to(dtype), sin.to(dtype))
        if not compiling:
            self._tables[key] = tables
        return tables

    def forward(self, x: torch.Tensor, offset: int = 0, seq_dim: int = -2) -> torch.Tensor:
        """Rotate ``x [..., head_size]`` whose index ``t`` along ``seq_dim`` is at position
        ``offset + t`` (``seq_dim`` counts from the front or, negative, from the back; it must
        name a dim other than the channels, and ``offset`` must be ``>= 0``)."""
        if x.dim() < 2 or x.shape[-1] != self.head_size:
            raise ValueError(
                f"expected [..., T, ..., {self.head_size}] (at least 2 dims), got {tuple(x.shape)}"
            )
        if not x.dtype.is_floating_point:
            raise TypeError(f"RoPE needs a floating-point x, got {x.dtype}")
        dim = seq_dim + x.dim() if seq_dim < 0 else seq_dim
        if not 0 <= dim < x.dim() - 1:
            raise ValueError(
                f"seq_dim={seq_dim} must name a dim of x {tuple(x.shape)} other than the last "
                "(channel) dim"
            )
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        if self.n_rotate == 0:
            return x
        seq_dim = dim
        n = x.shape[seq_dim]
        cos, sin = self._cos_sin(offset + n, x.device, x.dtype)
        view = _kernel_view(x, seq_dim, self.backend) if x.numel() else None
        if view is not None:
            return _RotateTriton.apply(view, cos, sin, offset, self.n_rotate).view(x.shape)
        shape = (n,) + (1,) * (x.dim() - seq_dim - 2) + (self.head_size,)
        cos = cos[offset : offset + n].view(shape)
        sin = sin[offset : offset + n].view(shape)
        perm = self.perm.to(x.device)
        inv_perm = self.inv_perm.to(x.device)
        return _Rotate.apply(x, cos, sin, perm, inv_perm)
