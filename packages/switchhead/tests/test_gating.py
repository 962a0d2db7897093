"""The fused expert-gate ops against float64 einsum formulas (reference, Triton, custom op)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from switchhead.gating import gated_expand, gated_sum
from switchhead.topk_gates import topk_gates


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


def gates_oracle(logits, k):
    """float64: sigmoid of the k largest logits per row (no ties in random data), else 0."""
    s = logits.double().sigmoid()
    kth = s.sort(-1, descending=True).values[..., k - 1 : k]
    return s * (s >= kth)


def check_topk_gates(backend, shape, k, dtype, device="cpu", tol=1e-9):
    g = torch.Generator().manual_seed(k)
    big = torch.randn(shape[0], shape[1] + 1, shape[2] * 2, generator=g, dtype=torch.float64)
    if dtype == torch.bfloat16:  # distinct per row (bf16 rounding would make ties)
        ranks = torch.rand(big.shape, generator=g).argsort(-1).double()
        big = ranks * 0.5 - big.shape[-1] / 4
    logits = (big[:, 1:, ::2] * 3).to(device=device, dtype=dtype).requires_grad_()  # strided
    gates = topk_gates(logits, k, backend)
    assert gates.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want_logits = logits.detach().double().requires_grad_()
    want = gates_oracle(want_logits, k)
    torch.testing.assert_close(gates.double().cpu(), want.cpu(), rtol=tol, atol=tol)
    assert ((gates > 0).sum(-1) == k).all()
    grad = torch.randn(want.shape, generator=g, dtype=torch.float64)
    (got,) = torch.autograd.grad(gates, logits, grad.to(device=device, dtype=gates.dtype))
    (ref,) = torch.autograd.grad(want, want_logits, grad)
    assert got.dtype == logits.dtype
    torch.testing.assert_close(got.double().cpu(), ref.cpu(), rtol=tol, atol=tol)


@settings(max_examples=15, deadline=None)
@given(
    rows=st.integers(1, 7),
    groups=st.integers(1, 5),
    e_k=st.sampled_from([(1, 1), (4, 2), (5, 5), (9, 3)]),
)
def test_topk_gates_reference(rows, groups, e_k):
    check_topk_gates("reference", (rows, groups, e_k[0]), e_k[1], torch.float64)


def test_topk_gates_errors_and_compile():
    logits = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match="k must be"):
        topk_gates(logits, 5)
    with pytest.raises(ValueError, match="float"):
        topk_gates(logits.long(), 1)

    def f(x):
        return topk_gates(x, 2).sum()

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(logits), f(logits))


@pytest.mark.interpret
@pytest.mark.parametrize(("shape", "k"), [((5, 3, 4), 2), ((2, 1, 1), 1), ((40, 2, 13), 4)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_topk_gates_triton_interpreter(shape, k, dtype):
    tol = {torch.float64: 1e-9, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    check_topk_gates("triton", shape, k, dtype, tol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize(("shape", "k"), [((8192, 8, 4), 2), ((300, 4, 16), 3), ((3, 1, 64), 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_gates_cuda(shape, k, dtype):
    check_topk_gates(None, shape, k, dtype, "cuda", tol=1e-6 if dtype == torch.float32 else 1e-2)
