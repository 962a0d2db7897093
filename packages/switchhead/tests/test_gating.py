"""The fused expert-gate ops against float64 einsum formulas (reference, Triton, custom op)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from switchhead.gating import gated_expand, gated_sum


def strided(shape, dtype, device="cpu", seed=0):
    """A random non-contiguous view: every other row of a wider tensor along dim 0 and padding
    in the last dim, so kernels must honour strides."""
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(shape[0] * 2, *shape[1:-1], shape[-1] + 3, generator=g, dtype=torch.float64)
    return big[::2, ..., 1 : shape[-1] + 1].to(device=device, dtype=dtype)


def expected(x, gate, r, grad_y, grad_a):
    """float64 einsum formulas of both ops and their gradients."""
    x, gate, r = (t.detach().double().requires_grad_() for t in (x, gate, r))
    y = torch.einsum("mhed,mhe->mhd", x, gate)
    a = torch.einsum("mhd,mhe->mhed", r, gate)
    grads = torch.autograd.grad((y * grad_y.double()).sum() + (a * grad_a.double()).sum(),
                                (x, gate, r))  # fmt: skip
    return y, a, grads


def run(x, gate, r, grad_y, grad_a, backend):
    x, gate, r = (t.detach().clone().requires_grad_() for t in (x, gate, r))
    y = gated_sum(x, gate, backend)
    a = gated_expand(r, gate, backend)
    grads = torch.autograd.grad((y * grad_y).sum() + (a * grad_a).sum(), (x, gate, r))
    return y, a, grads


def compare(backend, m, h, e, d, dtype, device="cpu", tol=1e-9):
    x = strided((m, h, e, d), dtype, device, 1)
    r = strided((m, h, d), dtype, device, 2)
    gate = strided((m, h, e), torch.float32 if dtype != torch.float64 else dtype, device, 3)
    gate = gate * (gate > 0)  # some experts unchosen (gate 0)
    grad_y = strided((m, h, d), dtype, device, 4)
    grad_a = strided((m, h, e, d), dtype, device, 5)
    y, a, grads = run(x, gate, r, grad_y, grad_a, backend)
    y64, a64, grads64 = expected(x, gate, r, grad_y, grad_a)
    assert y.dtype == x.dtype and a.dtype == r.dtype and grads[1].dtype == gate.dtype
    for name, got, want in zip(
        ["y", "a", "dx", "dgate", "dr"], [y, a, *grads], [y64, a64, *grads64]
    ):
        torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=tol, atol=tol, msg=name)


@settings(max_examples=15, deadline=None)
@given(
    m=st.integers(1, 9),
    h=st.integers(1, 4),
    e=st.integers(1, 5),
    d=st.integers(1, 20),
)
def test_reference_matches_einsum(m, h, e, d):
    compare("reference", m, h, e, d, torch.float64)


def test_leading_dims_and_errors():
    x = torch.randn(2, 3, 4, 5, 6)
    gate = torch.rand(2, 3, 4, 5)
    y = gated_sum(x, gate)
    torch.testing.assert_close(y, (x * gate[..., None]).sum(-2))
    r = torch.randn(2, 3, 4, 6)
    torch.testing.assert_close(gated_expand(r, gate), r[..., None, :] * gate[..., None])
    with pytest.raises(ValueError, match="gates for"):
        gated_sum(x, gate[..., :3])
    with pytest.raises(ValueError, match=r"\[\.\.\., H, E\]"):
        gated_expand(r, gate[:1])
    with pytest.raises(TypeError, match="floating"):
        gated_sum(x, gate > 0.5)
    with pytest.raises(ValueError, match="unknown backend"):
        gated_sum(x, gate, backend="cuda")


def test_compile_fullgraph():
    def f(x, gate, r):
        return gated_sum(x, gate).sum() + gated_expand(r, gate).sum()

    x, gate, r = torch.randn(3, 2, 4, 8), torch.rand(3, 2, 4), torch.randn(3, 2, 8)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, gate, r), f(x, gate, r))


@pytest.mark.interpret
@pytest.mark.parametrize(("m", "h", "e", "d"), [(5, 3, 4, 10), (1, 1, 1, 1), (37, 2, 3, 33)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_triton_interpreter(m, h, e, d, dtype):
    tol = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    compare("triton", m, h, e, d, dtype, tol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "h", "e", "d"), [(8192, 4, 4, 104), (300, 3, 5, 64), (7, 1, 2, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda(m, h, e, d, dtype):
    compare(None, m, h, e, d, dtype, "cuda", tol=1e-5 if dtype == torch.float32 else 2e-2)
