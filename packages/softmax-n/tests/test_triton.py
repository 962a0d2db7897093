"""The fused Triton kernel (interpreter on CPU, and CUDA) and the fused PyTorch kernels on CUDA,
against the float64 formula of ``softmax_n.testing``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from softmax_n import flash_attention_n, flash_attention_n_triton
from softmax_n.testing import direct_attention_n


def make(b, h, hk, length, s, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()
    return t(b, h, length, d), t(b, hk, s, d), t(b, hk, s, d)


def check(q, k, v, n, causal, tol, fn=flash_attention_n_triton, **kw):
    out = fn(q, k, v, is_causal=causal, softmax_n_param=n, **kw)
    rep = q.shape[1] // k.shape[1]
    kf, vf = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    expected = direct_attention_n(q, kf, vf, n, causal=causal)
    err = lambda a, b: ((a.double() - b).norm() / b.norm().clamp_min(1e-12)).item()
    assert err(out, expected) < tol
    g = torch.randn_like(out)
    leaves = (q, k, v) + ((n,) if isinstance(n, torch.Tensor) and n.requires_grad else ())
    got = torch.autograd.grad(out, leaves, g)
    want = torch.autograd.grad(expected, leaves, g.double())
    for a, b in zip(got, want):
        assert err(a, b) < 3 * tol


@pytest.mark.interpret
@pytest.mark.parametrize("n", [0.0, 1e-3, 0.5, 1.0, 3.0, 100.0])
def test_interpret_n_values(n):
    check(*make(1, 2, 2, 19, 23, 16, torch.float32, "cpu"), n, causal=True, tol=1e-5)


@pytest.mark.interpret
@pytest.mark.parametrize(
    ("length", "s", "hk", "causal"),
    [
        (20, 37, 1, True),
        (37, 20, 3, True),
        (33, 33, 3, False),
        (16, 16, 1, True),
        (5, 40, 3, False),
    ],
)
def test_interpret_shapes_causal_gqa_per_head_n(length, s, hk, causal):
    n = torch.tensor([0.1, 1.0, 5.0]).view(3, 1, 1).requires_grad_()
    check(*make(2, 3, hk, length, s, 24, torch.float32, "cpu"), n, causal=causal, tol=1e-5)


@pytest.mark.interpret
def test_interpret_half_precision_and_shared_kv():
    q, k, v = make(1, 2, 1, 18, 18, 32, torch.float16, "cpu")
    check(q, k, v, 1.0, causal=True, tol=1e-2)
    k3, v3 = (t.detach()[:, 0].requires_grad_() for t in (k, v))  # [B, S, D] shared by heads
    out = flash_attention_n_triton(q, k3, v3, is_causal=False, softmax_n_param=0.5)
    expected = direct_attention_n(q, k.expand(1, 2, 18, 32), v.expand(1, 2, 18, 32), 0.5)
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-2


@pytest.mark.interpret
@settings(max_examples=6, deadline=None)
@given(
    length=st.integers(1, 40),
    s=st.integers(1, 40),
    d=st.sampled_from([8, 16, 40, 72]),
    causal=st.booleans(),
    n=st.sampled_from([0.5, 2.0]),
)
def test_interpret_fuzz(length, s, d, causal, n):
    if causal and length > s:
        n = max(n, 0.5)  # leading rows see no key: 0 for n > 0
    check(*make(1, 2, 1, length, s, d, torch.float32, "cpu"), n, causal=causal, tol=1e-5)


@pytest.mark.interpret
def test_interpret_head_dim_256():
    check(*make(1, 1, 1, 17, 9, 256, torch.float32, "cpu"), 1.0, causal=False, tol=1e-5)


def test_triton_rejects_masks_and_large_heads():
    q, k, v = make(1, 2, 2, 4, 4, 8, torch.float32, "cpu")
    with pytest.raises(ValueError):
        flash_attention_n(
            q, k, v, 1.0, attn_mask=torch.ones(4, 4, dtype=torch.bool), backend="triton"
        )


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("dtype", "d"),
    [(torch.bfloat16, 64), (torch.float16, 128), (torch.float32, 80), (torch.bfloat16, 256)],
)
@pytest.mark.parametrize(
    ("length", "s", "causal"), [(300, 300, True), (200, 333, True), (257, 130, False)]
)
def test_cuda_triton_kernel(dtype, d, length, s, causal):
    tol = 1e-2 if dtype != torch.float32 else 1e-4
    n = torch.tensor([0.5, 1.0, 3.0, 10.0], device="cuda").view(4, 1, 1).requires_grad_()
    check(*make(2, 4, 2, length, s, d, dtype, "cuda"), n, causal=causal, tol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_fused_torch_kernels(dtype, d, causal):
    n = torch.tensor([0.5, 1.0, 3.0, 0.0], device="cuda").view(4, 1, 1).requires_grad_()
    q, k, v = make(2, 4, 4, 256, 256, d, dtype, "cuda")
    check(q, k, v, n, causal=causal, tol=1e-2, fn=flash_attention_n, backend="torch")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["cudnn", "flash", "efficient"])
def test_cuda_each_fused_kernel(kernel, monkeypatch):
    from softmax_n import fused

    q, k, v = make(2, 4, 4, 200, 200, 64, torch.bfloat16, "cuda")
    q0 = q.detach()
    if kernel == "cudnn" and fused.pick_kernel(q0, q0, q0, False, True) != "cudnn":
        pytest.skip("cuDNN attention not usable here")
    monkeypatch.setattr(fused, "pick_kernel", lambda *a, **kw: kernel)
    check(q, k, v, 1.0, causal=True, tol=1e-2, fn=flash_attention_n, backend="torch")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_masks_and_bias(dtype):
    q, k, v = make(2, 4, 4, 100, 120, 64, dtype, "cuda")
    keep = torch.rand(2, 1, 100, 120, device="cuda") > 0.3
    keep[:, :, 7] = False  # a fully masked row
    bias = torch.randn(4, 100, 120, device="cuda", dtype=dtype)
    out = flash_attention_n(q, k, v, 1.0, attn_mask=keep, attn_bias=bias)
    expected = direct_attention_n(q, k, v, 1.0, keep=keep, bias=bias)
    assert torch.all(out[:, :, 7] == 0)
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-2
    g = torch.randn_like(out)
    for a, b in zip(
        torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(expected, (q, k, v), g.double())
    ):
        assert ((a.double() - b).norm() / b.norm()).item() < 3e-2


@pytest.mark.gpu
def test_cuda_compile_fullgraph():
    q, k, v = make(2, 4, 4, 128, 128, 64, torch.bfloat16, "cuda")
    fn = torch.compile(
        lambda q, k, v: flash_attention_n(q, k, v, 1.0, is_causal=True), fullgraph=True
    )
    check(q, k, v, 1.0, causal=True, tol=1e-2, fn=lambda q, k, v, **kw: fn(q, k, v))
