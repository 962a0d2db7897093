"""RotaryEmbedding against a per-channel-pair float64 rotation (reference, Triton, compile)."""

from __future__ import annotations

import pytest
import torch
from switchhead import RotaryEmbedding


def rotation_oracle(x, positions, n_rotate, base):
    """x [..., T, D] (seq at -2): rotate pairs (c, c + n/2) of the first n_rotate channels."""
    out = x.clone()
    half = n_rotate // 2
    for c in range(half):
        theta = positions.double() * base ** (-2 * c / n_rotate)
        cos, sin = theta.cos()[:, None], theta.sin()[:, None]
        a, b = x[..., c : c + 1], x[..., c + half : c + half + 1]
        out[..., c : c + 1] = a * cos - b * sin
        out[..., c + half : c + half + 1] = b * cos + a * sin
    return out


def check(backend, n_rotate, head, shape, seq_dim, offset, dtype, device="cpu", tol=1e-9):
    """x of ``shape`` (head channels last) with its sequence at ``seq_dim``; a strided view."""
    rope = RotaryEmbedding(n_rotate, 500.0, head).to(device)
    rope.backend = backend
    g = torch.Generator().manual_seed(n_rotate + head)
    big = torch.randn(*shape[:-1], head + 2, generator=g, dtype=torch.float64)
    x = big[..., 1 : head + 1].to(device=device, dtype=dtype).requires_grad_()
    y = rope(x, offset, seq_dim=seq_dim)
    assert y.shape == x.shape and y.dtype == x.dtype
    x64 = x.detach().double().requires_grad_()
    moved = x64.movedim(seq_dim, -2)
    want = rotation_oracle(moved, torch.arange(x.shape[seq_dim]) + offset, n_rotate, 500.0)
    want = want.movedim(-2, seq_dim)
    torch.testing.assert_close(y.double().cpu(), want, rtol=tol, atol=tol)
    grad = torch.randn(want.shape, generator=g, dtype=torch.float64)
    (got,) = torch.autograd.grad(y, x, grad.to(device=device, dtype=dtype))
    (ref,) = torch.autograd.grad(want, x64, grad)
    torch.testing.assert_close(got.double().cpu(), ref, rtol=tol, atol=tol)


CASES = [
    (4, 4, (2, 5, 4), 1, 0),
    (6, 10, (2, 7, 2, 3, 10), 1, 3),  # [B, T, 2, H, D] as the fused q/k path
    (2, 5, (3, 2, 6, 5), 2, 1),  # [B, H, T, D]
    (0, 3, (2, 4, 3), 1, 0),
]


@pytest.mark.parametrize(("n_rotate", "head", "shape", "seq_dim", "offset"), CASES)
def test_reference(n_rotate, head, shape, seq_dim, offset):
    check("reference", n_rotate, head, shape, seq_dim, offset, torch.float64)


def test_tables_grow_and_errors():
    rope = RotaryEmbedding(4, 10000.0, 6)
    x = torch.randn(1, 3, 6, dtype=torch.float64)
    rope(x, 0)
    long = torch.randn(1, 50, 6, dtype=torch.float64)
    torch.testing.assert_close(
        rope(long, 5), rotation_oracle(long, torch.arange(50) + 5, 4, 10000.0)
    )
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(3)
    with pytest.raises(ValueError, match="channels"):
        rope(torch.randn(2, 3, 4))


def test_compile_fullgraph():
    rope = RotaryEmbedding(4, 10000.0, 8)
    x = torch.randn(2, 5, 3, 8)
    compiled = torch.compile(lambda t: rope(t, 2, seq_dim=1), fullgraph=True)
    torch.testing.assert_close(compiled(x), rope(x, 2, seq_dim=1))


@pytest.mark.interpret
@pytest.mark.parametrize(("n_rotate", "head", "shape", "seq_dim", "offset"), CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_interpreter(n_rotate, head, shape, seq_dim, offset, dtype):
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    check("triton", n_rotate, head, shape, seq_dim, offset, dtype, tol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize(("n_rotate", "head", "shape", "seq_dim", "offset"), CASES)
def test_triton_cuda(n_rotate, head, shape, seq_dim, offset):
    check(None, n_rotate, head, shape, seq_dim, offset, torch.float32, "cuda", tol=1e-5)
