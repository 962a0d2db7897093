"""softmax_n and the attention functions against float64 formulas written out here."""

from __future__ import annotations

import math

import pytest
import torch
from softmax_n import flash_attention_n, slow_attention_n, softmax_n, softmax_n_attention_fn

N_VALUES = [0.0, 1e-3, 0.5, 1.0, 3.0, 100.0]


def direct_softmax_n(x: torch.Tensor, n: float) -> torch.Tensor:
    e = x.double().exp()
    return e / (n + e.sum(-1, keepdim=True))


@pytest.mark.parametrize("n", N_VALUES)
def test_softmax_n_matches_the_definition(n):
    x = torch.randn(4, 9, dtype=torch.float64)
    torch.testing.assert_close(softmax_n(x, n), direct_softmax_n(x, n))
    assert torch.all(softmax_n(x, n).sum(-1) <= 1 + 1e-12)


@pytest.mark.parametrize("n", [0.5, 1.0, 3.0])
def test_softmax_n_gradient(n):
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: softmax_n(t, n), (x,))
    nt = torch.tensor(n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, m: softmax_n(t, m), (x, nt))


def test_extreme_logits_and_masked_rows():
    x = torch.tensor([[1e4, 1e4], [-1e4, -1e4], [-math.inf, -math.inf]], dtype=torch.float64)
    out = softmax_n(x, 1.0)
    torch.testing.assert_close(out[0], torch.full((2,), 0.5, dtype=torch.float64))
    assert torch.all(out[1:] == 0)
    assert torch.isnan(softmax_n(x[2:], 0.0)).all()  # as softmax
    with pytest.raises(ValueError, match="n >= 0"):
        softmax_n(x, -1.0)


def reference_attention(q, k, v, n, keep=None, bias=None, scale=None):
    q, k, v = q.double(), k.double(), v.double()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.double()
    if keep is not None:
        s = s.masked_fill(~keep, -math.inf)
    e = s.exp()
    n = n.double() if isinstance(n, torch.Tensor) else n
    return (e / (n + e.sum(-1, keepdim=True))) @ v


def inputs(b=2, h=3, length=5, s=7, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()
    return make(b, h, length, d), make(b, h, s, d), make(b, h, s, d)


FUNCTIONS = [flash_attention_n, slow_attention_n]


def call(fn, q, k, v, n, **kw):
    if fn is slow_attention_n:
        return fn(q, k, v, softmax_n_param=n, **kw)
    return fn(q, k, v, n, **kw)


@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize("n", N_VALUES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [(5, 7), (6, 6)])
def test_attention_matches_reference(fn, n, causal, lengths):
    q, k, v = inputs(length=lengths[0], s=lengths[1])
    keep = None
    if causal:
        keep = torch.ones(*lengths, dtype=torch.bool).tril(lengths[1] - lengths[0])
    out = call(fn, q, k, v, n, is_causal=causal)
    expected = reference_attention(q, k, v, n, keep)
    # float64 throughout (n included): agreement to ~1e-12, so a float32 step anywhere fails.
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(expected, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_per_head_learnable_n(fn):
    q, k, v = inputs()
    n = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64).view(3, 1, 1).requires_grad_()
    out = call(fn, q, k, v, n)
    expected = reference_attention(q, k, v, n)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
    (gn,) = torch.autograd.grad(out.sum(), (n,))
    (want,) = torch.autograd.grad(expected.sum(), (n,))
    torch.testing.assert_close(gn, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_masks_and_bias(fn):
    q, k, v = inputs()
    keep = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[..., 0] = True
    bias = torch.randn(3, 5, 7, dtype=torch.float64)  # ALiBi-like, per head
    out = call(fn, q, k, v, 1.0, attn_mask=keep, attn_bias=bias)
    torch.testing.assert_close(out, reference_attention(q, k, v, 1.0, keep, bias))
    float_mask = torch.zeros(5, 7, dtype=torch.float64).masked_fill(~keep[0, 0], -math.inf)
    out = call(fn, q, k, v, 1.0, attn_mask=float_mask)
    torch.testing.assert_close(out, reference_attention(q, k, v, 1.0, keep[0, 0]))


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_fully_masked_rows_are_zero_for_positive_n(fn):
    q, k, v = inputs()
    keep = torch.ones(5, 7, dtype=torch.bool)
    keep[2] = False
    out = call(fn, q, k, v, 1.0, attn_mask=keep)
    assert torch.all(out[:, :, 2] == 0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_shared_and_grouped_key_values(fn):
    q, _, _ = inputs(h=4)
    g = torch.Generator().manual_seed(2)
    k3 = torch.randn(2, 7, 8, generator=g, dtype=torch.float64)
    v3 = torch.randn(2, 7, 8, generator=g, dtype=torch.float64)
    out = call(fn, q, k3, v3, 0.5)
    expected = reference_attention(
        q, k3[:, None].expand(2, 4, 7, 8), v3[:, None].expand(2, 4, 7, 8), 0.5
    )
    torch.testing.assert_close(out, expected)
    kg = torch.randn(2, 2, 7, 8, generator=g, dtype=torch.float64)
    vg = torch.randn(2, 2, 7, 8, generator=g, dtype=torch.float64)
    out = call(fn, q, kg, vg, 0.5, scale=0.3)
    expected = reference_attention(
        q, kg.repeat_interleave(2, 1), vg.repeat_interleave(2, 1), 0.5, scale=0.3
    )
    torch.testing.assert_close(out, expected)


def test_n_zero_equals_sdpa():
    q, k, v = inputs(dtype=torch.float32)
    out = flash_attention_n(q, k, v, 0.0, is_causal=False)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_dropout_is_statistically_unbiased():
    torch.manual_seed(0)
    q, k, v = inputs(b=64, dtype=torch.float32)
    with torch.no_grad():
        plain = flash_attention_n(q, k, v, 1.0)
        dropped = flash_attention_n(q, k, v, 1.0, dropout_p=0.3)
    assert not torch.allclose(dropped, plain)
    assert (dropped.mean(0) - plain.mean(0)).abs().mean() < 0.05


def test_inputs_are_not_mutated():
    q, k, v = inputs()
    copies = [t.detach().clone() for t in (q, k, v)]
    keep = torch.ones(5, 7, dtype=torch.bool)
    slow_attention_n(q, k, v, attn_mask=keep, softmax_n_param=1.0)
    flash_attention_n(q, k, v, 1.0, attn_mask=keep)
    for t, c in zip((q, k, v), copies):
        assert torch.equal(t.detach(), c)
    assert keep.all()


def test_attention_fn_has_the_sdpa_signature():
    q, k, v = inputs(length=6, s=6)
    fn = softmax_n_attention_fn(1.0)
    out = fn(q, k, v, attn_mask=None, is_causal=True, scale=None, dropout_p=0.0)
    keep = torch.ones(6, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(out, reference_attention(q, k, v, 1.0, keep))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    ("backend", "d"), [("cudnn", 64), ("cudnn", 128), ("flash", 64), ("flash", 256)]
)
def test_cuda_kernels_match_reference(dtype, causal, backend, d, monkeypatch):
    from softmax_n import flash
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backend == "cudnn" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("cuDNN attention is used from compute capability 9.0")
    used = []
    kernel_forward = flash._kernel_forward
    monkeypatch.setattr(
        flash, "_kernel_forward", lambda name, *a: used.append(name) or kernel_forward(name, *a)
    )
    q, k, v = (t.detach().cuda().to(dtype).requires_grad_() for t in inputs(length=130, s=130, d=d))
    n = torch.tensor([0.5, 1.0, 3.0], device="cuda").view(3, 1, 1).requires_grad_()
    sdpa_backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    with sdpa_kernel([sdpa_backend[backend]]):
        out = flash_attention_n(q, k, v, n, is_causal=causal)
    assert used == [backend]
    keep = torch.ones(130, 130, dtype=torch.bool, device="cuda").tril() if causal else None
    expected = reference_attention(q, k, v, n, keep)
    assert (out.double() - expected).norm() / expected.norm() < 1e-2
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, n), g)
    want = torch.autograd.grad(expected, (q, k, v, n), g.double())
    for a, b in zip(got, want):
        assert (a.double() - b).norm() / b.norm() < 2e-2


@pytest.mark.gpu
def test_cuda_fully_masked_rows_and_cross_lengths():
    q, k, v = (t.detach().cuda().half().requires_grad_() for t in inputs(length=40, s=70, d=64))
    keep = torch.rand(40, 70, device="cuda") > 0.3
    keep[3] = False
    out = flash_attention_n(q, k, v, 1.0, attn_mask=keep)
    expected = reference_attention(q, k, v, 1.0, keep)
    assert (out[..., 3, :] == 0).all()
    assert (out.double() - expected).norm() / expected.norm() < 1e-2
