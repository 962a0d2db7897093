"""softmax_n and the attention functions against float64 formulas written out here."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from softmax_n import flash_attention_n, slow_attention_n, softmax_n, softmax_n_attention_fn
from softmax_n.testing import direct_attention_n

from testing_support import rel_error

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
    expected = direct_attention_n(q, k, v, n, keep)
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
    expected = direct_attention_n(q, k, v, n)
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
    torch.testing.assert_close(out, direct_attention_n(q, k, v, 1.0, keep, bias))
    float_mask = torch.zeros(5, 7, dtype=torch.float64).masked_fill(~keep[0, 0], -math.inf)
    out = call(fn, q, k, v, 1.0, attn_mask=float_mask)
    torch.testing.assert_close(out, direct_attention_n(q, k, v, 1.0, keep[0, 0]))


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
    expected = direct_attention_n(
        q, k3[:, None].expand(2, 4, 7, 8), v3[:, None].expand(2, 4, 7, 8), 0.5
    )
    torch.testing.assert_close(out, expected)
    kg = torch.randn(2, 2, 7, 8, generator=g, dtype=torch.float64)
    vg = torch.randn(2, 2, 7, 8, generator=g, dtype=torch.float64)
    out = call(fn, q, kg, vg, 0.5, scale=0.3)
    expected = direct_attention_n(
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
    torch.testing.assert_close(out, direct_attention_n(q, k, v, 1.0, keep))


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
    expected = direct_attention_n(q, k, v, n, keep)
    assert rel_error(out, expected) < 1e-2
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, n), g)
    want = torch.autograd.grad(expected, (q, k, v, n), g.double())
    for a, b in zip(got, want):
        assert rel_error(a, b) < 2e-2


@pytest.mark.gpu
def test_cuda_fully_masked_rows_and_cross_lengths():
    q, k, v = (t.detach().cuda().half().requires_grad_() for t in inputs(length=40, s=70, d=64))
    keep = torch.rand(40, 70, device="cuda") > 0.3
    keep[3] = False
    out = flash_attention_n(q, k, v, 1.0, attn_mask=keep)
    expected = direct_attention_n(q, k, v, 1.0, keep)
    assert (out[..., 3, :] == 0).all()
    assert rel_error(out, expected) < 1e-2


# ---------------------------------------------------------------- issue #15 ------------------
# (test_bad_inputs.py has the matrix of bad and edge-case inputs; these are the named defects)


def test_empty_lengths_do_not_kill_the_process():
    """PyTorch's CPU flash kernel dies with SIGFPE on L = 0 or S = 0; flash_attention_n must not
    reach it. A child process runs the cases, so that a crash fails this test only."""
    code = textwrap.dedent(
        """
        import torch
        import torch.nn.functional as F
        from softmax_n import flash_attention_n
        for b, h, l, s in [(2, 3, 0, 5), (2, 3, 4, 0), (2, 0, 4, 5), (0, 3, 4, 5), (2, 3, 0, 0)]:
            q = torch.randn(b, h, l, 8, requires_grad=True)
            k, v = (torch.randn(b, h, s, 8, requires_grad=True) for _ in range(2))
            for mask in (None, torch.ones(l, s, dtype=torch.bool)):
                out = flash_attention_n(q, k, v, 1.0, attn_mask=mask)
                # SDPA's convention (a row that sees no key is 0), written out: SDPA itself is
                # what crashes on some torch versions (2.11's CPU kernel: SIGFPE)
                assert torch.equal(out, torch.zeros(b, h, l, 8)), (b, h, l, s)
                out.sum().backward()
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == "ok", (res.returncode, res.stderr[-3000:])


@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.float16])
def test_masks_that_sdpa_refuses_are_refused(fn, dtype):
    """An integer 0/1 mask was added to the scores as a bias; SDPA refuses it (and float masks
    other than the query's dtype or float32)."""
    q, k, v = inputs(dtype=torch.float32)
    mask = (torch.rand(5, 7, generator=torch.Generator().manual_seed(0)) > 0.3).to(dtype)
    with pytest.raises(RuntimeError):
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with pytest.raises(TypeError, match="bool"):
        call(fn, q, k, v, 1.0, attn_mask=mask)


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_masks_that_sdpa_accepts_are_accepted(fn):
    q, k, v = (t.detach().bfloat16() for t in inputs())
    keep = torch.rand(5, 7, generator=torch.Generator().manual_seed(0)) > 0.3
    keep[:, 0] = True
    additive = torch.zeros(5, 7).masked_fill(~keep, -math.inf)  # float32 with a bf16 query
    for mask in (keep, additive, additive.bfloat16()):
        out = call(fn, q, k, v, 0.0, attn_mask=mask)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(out, sdpa, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize("causal", [False, True])
def test_value_head_dim_may_differ_from_the_query(fn, causal):
    """MLA-style ``Dv != D``: SDPA takes it; the CPU kernel failed."""
    q, k, _ = inputs(dtype=torch.float32)
    v = torch.randn(2, 3, 7, 5, generator=torch.Generator().manual_seed(3)).requires_grad_()
    n = torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1).requires_grad_()
    out = call(fn, q, k, v, n, is_causal=causal)
    keep = torch.ones(5, 7, dtype=torch.bool).tril(2) if causal else None
    expected = direct_attention_n(q, k, v, n, keep)
    assert out.shape == (2, 3, 5, 5)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, n), g)
    want = torch.autograd.grad(expected, (q, k, v, n), g.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(call(fn, q, k, v, 0.0), sdpa)


@pytest.mark.parametrize("fn", [*FUNCTIONS, "softmax_n_attention_fn", "apply_attention_softmax_n"])
@pytest.mark.parametrize(
    ("n", "error"),
    [
        (float("nan"), "finite n >= 0"),  # was read as n = 0
        (float("inf"), "finite n >= 0"),
        (-1.0, "finite n >= 0"),
        (torch.tensor([1.0, float("nan"), 1.0]).view(3, 1, 1), "finite n >= 0"),
        (torch.tensor([0.1, 1.0, 10.0]), "ambiguous"),  # [H]: broadcast against the keys
        (torch.tensor([0.1, 1.0, 10.0]).view(3, 1), "ambiguous"),  # [H, 1]: against L = H
        (torch.ones(3, 1, 7), "last dim"),
        (torch.ones(2, 1, 1), "broadcast"),
    ],
    ids=["nan", "inf", "negative", "tensor-nan", "H", "H-1", "per-key", "wrong-heads"],
)
def test_n_is_validated(fn, n, error):
    q, k, v = inputs(h=3, length=3, s=3)  # L = S = H: a misread n would broadcast silently
    shape_only = isinstance(n, torch.Tensor) and error == "broadcast"
    if fn == "softmax_n_attention_fn":
        if not shape_only:  # the values (and the shape rules that need no input) at once
            with pytest.raises(ValueError, match=error):
                softmax_n_attention_fn(n)
            return
        fn = softmax_n_attention_fn(n)
        with pytest.raises(ValueError, match=error):
            fn(q, k, v)
        return
    if fn == "apply_attention_softmax_n":
        from softmax_n.surgery import apply_attention_softmax_n

        if shape_only:
            return  # needs the input shapes: checked at the call
        with pytest.raises(ValueError, match=error):
            apply_attention_softmax_n(torch.nn.Linear(2, 2), n)
        return
    with pytest.raises(ValueError, match=error):
        call(fn, q, k, v, n)


def test_softmax_n_validates_n():
    x = torch.randn(2, 3, 4)
    for n, error in [
        (float("nan"), "finite n >= 0"),
        (torch.tensor(-1.0), "finite n >= 0"),
        (torch.ones(4), "reduced dim"),  # one n per entry of the reduced dim
        (torch.ones(5, 1), "broadcast"),
        (torch.ones(1, 2, 3, 1), "broadcast"),  # would grow x
    ]:
        with pytest.raises(ValueError, match=error):
            softmax_n(x, n)
    with pytest.raises(TypeError):
        softmax_n(x, "1")
    torch.testing.assert_close(softmax_n(x, torch.ones(3, 1)), direct_softmax_n(x, 1.0).float())


@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fully_masked_rows_are_zero_for_n_zero_as_sdpa(fn, dtype):
    """One behaviour on every path: 0, what SDPA returns for a fully masked row."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in inputs())
    keep = torch.ones(5, 7, dtype=torch.bool)
    keep[2] = False
    additive = torch.zeros(5, 7, dtype=dtype).masked_fill(~keep, -math.inf)
    for mask in (keep, additive):
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert torch.all(sdpa[:, :, 2] == 0)  # SDPA's behaviour on this torch version
        out = call(fn, q, k, v, 0.0, attn_mask=mask)
        torch.testing.assert_close(out, sdpa)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads)
        assert torch.all(grads[0][:, :, 2] == 0)
    # L > S, causal: the first rows see no key
    q2 = q.detach()[:, :, :7].repeat(1, 1, 2, 1)[:, :, :9]
    out = call(fn, q2, k, v, 0.0, is_causal=True)
    assert torch.all(out[:, :, :2] == 0) and torch.isfinite(out).all()


@pytest.mark.parametrize("fn", [*FUNCTIONS, softmax_n])
def test_large_logits_keep_full_precision(fn):
    """float32 q = k = 10 (logits 240): the log-sum-exp formed at the logits' magnitude lost
    ~1e-5 relative; the max-shifted form is exact here."""
    if fn is softmax_n:
        x = torch.tensor([240.0, 240.0, 239.0, 238.5])
        out, expected = fn(x, 1.0), direct_softmax_n(x, 1.0)
    else:
        q = torch.full((1, 1, 3, 24), 10.0)
        v = torch.randn(1, 1, 3, 24, generator=torch.Generator().manual_seed(0))
        out = call(fn, q, q, v, 1.0, scale=0.1)
        expected = direct_attention_n(q, q, v, 1.0, scale=0.1)
    assert rel_error(out, expected) < 1e-6


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_gradient_in_n_at_zero(fn):
    """d out / d n at n = 0 is finite (-out * exp(-lse)); through log n it was 0 * inf = NaN."""
    q, k, v = inputs()
    n = torch.tensor([0.0, 0.5, 0.0], dtype=torch.float64).view(3, 1, 1).requires_grad_()
    out = call(fn, q, k, v, n)
    expected = direct_attention_n(q, k, v, n)
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, (n,), g)
    (want,) = torch.autograd.grad(expected, (n,), g)
    torch.testing.assert_close(got, want)


def test_cuda_kernel_choice_needs_ampere_for_flash(monkeypatch):
    """PyTorch's flash kernel needs compute capability 8.0; older GPUs go to the reference."""
    from softmax_n import flash

    monkeypatch.setattr(torch.backends.cuda, "flash_sdp_enabled", lambda: True)
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    q = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float16, shape=(1, 1, 8, 64))
    for capability, kernel in [((7, 5), None), ((8, 0), "flash"), ((9, 0), "cudnn")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert flash._kernel_name(q, q, q, None, False) == kernel
