"""Attention sinks (``sink``: one learnable logit per query head, as gpt-oss) on every path:
``slow_attention_n``, ``flash_attention_n`` (PyTorch's fused kernels plus the gate
``sigmoid(lse - sink)``) and the Triton kernel (``interpret`` marker on CPU, ``gpu`` on CUDA),
forward and gradients of q, k, v and the sink, against the package's float64 oracle
(``softmax_n.testing.direct_attention_n(..., sink=)``): the softmax over the scores and one extra
column holding the sink, that column dropped. Plus the
argument checks (before any kernel) and gpt-oss's ``s_aux`` through the transformers adapter.
"""

from __future__ import annotations

import math

import pytest
import softmax_n.flash as flash_module
import softmax_n.functional as functional_module
import softmax_n.fused as fused_module
import torch
from softmax_n import (
    flash_attention_n,
    flash_attention_n_triton,
    slow_attention_n,
    softmax_n_attention_fn,
)
from softmax_n.testing import direct_attention_n

from testing_support import rel_error as rel_err

# numpy's warnings from the interpreter: exp2(-inf - -inf) in rows that see no key
pytestmark = pytest.mark.filterwarnings(
    "ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning"
)

FUNCTIONS = [slow_attention_n, flash_attention_n]
SINK = [-1.0, 0.0, 2.5]  # per head (H = 3): weight on the sink from ~0.3 / L to most of it


def make(b=2, h=3, hk=3, length=5, s=7, d=8, dtype=torch.float64, sink=SINK, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    q, k, v = (x.requires_grad_() for x in (t(b, h, length, d), t(b, hk, s, d), t(b, hk, s, d)))
    return q, k, v, torch.tensor(sink, dtype=dtype).requires_grad_()


def grads(out, leaves, g):
    return torch.autograd.grad(out, leaves, g)


def check(out, expected, leaves, tol):
    """Output and gradients (every leaf: q, k, v and the sink) within ``tol`` (relative
    Frobenius error; 3x for gradients)."""
    assert out.shape == expected.shape
    assert rel_err(out, expected) < tol
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = g.to(out.device)
    got = grads(out, leaves, g.to(out.dtype))
    want = grads(expected, leaves, g)
    for name, a, b in zip(["q", "k", "v", "sink"], got, want):
        assert a.dtype == b.dtype, name  # the sink's gradient comes in the sink's dtype
        assert rel_err(a, b) < 3 * tol, name


# ---------------------------------------------------------------- CPU: reference and fused --


@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    ("length", "s", "hk"), [(5, 7, 3), (6, 6, 1), (7, 4, 3)], ids=["L<S", "L==S-mqa", "L>S"]
)
def test_matches_oracle(fn, causal, length, s, hk):
    """float64 throughout: agreement to ~1e-12 (L > S causal: the first rows see no key and are
    0, with zero gradients)."""
    q, k, v, sink = make(hk=hk, length=length, s=s)
    out = fn(q, k, v, is_causal=causal, sink=sink)
    expected = direct_attention_n(q, k, v, sink=sink, causal=causal)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(grads(out, (q, k, v, sink), g), grads(expected, (q, k, v, sink), g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_masks_bias_and_rows_without_keys(fn):
    q, k, v, sink = make()
    keep = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[0, 0, 2] = False  # a row that sees no key: 0, zero gradients
    bias = torch.randn(3, 5, 7, dtype=torch.float64)  # ALiBi-like, per head
    out = fn(q, k, v, attn_mask=keep, attn_bias=bias, is_causal=True, sink=sink)
    expected = direct_attention_n(q, k, v, keep=keep, bias=bias, causal=True, sink=sink)
    check(out, expected, (q, k, v, sink), 1e-10)
    assert torch.all(out[0, :, 2] == 0)
    float_mask = torch.zeros(5, 7, dtype=torch.float64).masked_fill(~keep[1, 0], -math.inf)
    out = fn(q, k, v, attn_mask=float_mask, sink=sink, scale=0.3)
    check(
        out,
        direct_attention_n(q, k, v, keep=keep[1, 0], scale=0.3, sink=sink),
        (q, k, v, sink),
        1e-10,
    )


@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize("sink_dtype", [torch.float64, torch.bfloat16])
def test_float32_inputs_and_other_sink_dtypes(fn, sink_dtype):
    """A sink in another float dtype than the inputs (fp32 master weights, bf16 activations or
    the reverse); computed in the inputs' working precision, its gradient in its own dtype."""
    q, k, v, _ = make(dtype=torch.float32, length=6, s=6)
    sink = torch.tensor(SINK, dtype=sink_dtype, requires_grad=True)
    out = fn(q, k, v, is_causal=True, sink=sink)
    assert out.dtype == torch.float32
    check(out, direct_attention_n(q, k, v, sink=sink, causal=True), (q, k, v, sink), 2e-6)


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_sink_is_softmax_n_with_n_exp_sink(fn):
    """``n = exp(sink)`` per head; a ``-inf`` sink is plain softmax (no sink for that head)."""
    q, k, v, sink = make()
    n = sink.detach().exp().view(3, 1, 1)
    torch.testing.assert_close(fn(q, k, v, sink=sink), fn(q, k, v, softmax_n_param=n))
    off = torch.tensor([-math.inf, 0.0, -math.inf], dtype=torch.float64, requires_grad=True)
    out = fn(q, k, v, sink=off)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out[:, [0, 2]], sdpa[:, [0, 2]])
    (d_sink,) = torch.autograd.grad(out.sum(), off)
    assert d_sink[0] == 0 and d_sink[2] == 0 and d_sink[1] != 0


def _cpu_flash_backward_is_exact() -> bool:
    """Whether PyTorch's CPU flash-attention backward, run as ``flash_attention_n`` runs it (the
    gated output and a log-sum-exp raised by a sink in place of its own), gives in float32 what
    it gives in float64 at logits ~100. On some CPUs it does not (a float32-vs-float64
    difference of ~6e5 in one head, seen on an AMD EPYC with torch 2.15), and the fused path can
    be no more exact than the kernel it runs."""
    aten = torch.ops.aten
    g = torch.Generator().manual_seed(0)
    t = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    q, k, v, grad = t(2, 3, 5, 8), t(2, 3, 7, 8), t(2, 3, 7, 8), t(2, 3, 5, 8)
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=40.0)[:2]
    sink = torch.tensor([70.0, 20.0, 0.0], dtype=torch.float64).view(1, 3, 1)
    lse_n = torch.logaddexp(lse, sink)
    out_n = out * torch.exp(lse - lse_n).unsqueeze(-1)
    results = []
    for dtype in (torch.float32, torch.float64):
        cast = lambda x: x.to(dtype).contiguous()
        results.append(aten._scaled_dot_product_flash_attention_for_cpu_backward(
            cast(grad), cast(q), cast(k), cast(v), cast(out_n), cast(lse_n), 0.0, True, scale=40.0
        ))  # fmt: skip
    return all(
        rel_err(a[:, h].double(), b[:, h]) < 1e-3 for a, b in zip(*results) for h in range(3)
    )


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_large_sinks_and_logits_stay_exact_in_float32(fn):
    """Sinks and scores beyond ``log(float32 max) = 88.7`` (``exp(sink)`` would be inf): in log
    space output and gradients keep float32 precision relative to the logits' magnitude (per
    head: 1e-4 for logits ~100)."""
    q, k, v, sink = make(dtype=torch.float32, sink=[100.0, 30.0, -100.0])
    if fn is flash_attention_n and (
        torch.__version__ < (2, 15) or not _cpu_flash_backward_is_exact()
    ):
        # the fused path is PyTorch's CPU attention kernel plus the gate: it is only as exact as
        # that kernel (torch 2.11's log-sum-exp is ~0.2 off at these logits; see the probe)
        pytest.skip("this torch's CPU attention kernel is not float32-exact at logits ~100")
    out = fn(q, k, v, is_causal=True, sink=sink, scale=40.0)
    expected = direct_attention_n(q, k, v, sink=sink, causal=True, scale=40.0)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = grads(out, (q, k, v, sink), g.float())
    want = grads(expected, (q, k, v, sink), g)
    for h in range(3):
        assert rel_err(out[:, h], expected[:, h]) < 1e-4, h
        for a, b in zip(got[:3], want[:3]):
            assert rel_err(a[:, h], b[:, h]) < 1e-3, h
    assert rel_err(got[3], want[3]) < 1e-3


def test_grouped_and_shared_key_values_and_attention_fn():
    q, k, v, sink = make(h=4, hk=2, sink=[0.5, -0.5, 1.0, 2.0])
    for fn in FUNCTIONS:
        check(
            fn(q, k, v, sink=sink), direct_attention_n(q, k, v, sink=sink), (q, k, v, sink), 1e-10
        )
        k3, v3 = (t.detach()[:, 0].requires_grad_() for t in (k, v))  # [B, S, D] for all heads
        check(
            fn(q, k3, v3, sink=sink),
            direct_attention_n(q, k3, v3, sink=sink),
            (q, k3, v3, sink),
            1e-10,
        )
    attention = softmax_n_attention_fn(sink=sink)  # SDPA's signature, the sink learnable
    out = attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=False)
    check(out, direct_attention_n(q, k, v, sink=sink), (q, k, v, sink), 1e-10)


def test_fused_cpu_kernel_runs_with_the_sink(monkeypatch):
    """The sink goes through the fused kernel plus gate (not the reference) where it can."""
    used = []
    kernel_forward = flash_module._kernel_forward
    monkeypatch.setattr(
        flash_module,
        "_kernel_forward",
        lambda name, *a: used.append(name) or kernel_forward(name, *a),
    )
    q, k, v, sink = make(length=6, s=6)
    flash_attention_n(q, k, v, is_causal=True, sink=sink).sum().backward()
    assert used == ["cpu"] and sink.grad is not None


def test_dropout_with_the_sink_runs_on_the_reference():
    q, k, v, sink = make(b=64, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        plain = flash_attention_n(q, k, v, sink=sink)
        dropped = flash_attention_n(q, k, v, sink=sink, dropout_p=0.3)
    assert not torch.allclose(dropped, plain)
    assert (dropped.mean(0) - plain.mean(0)).abs().mean() < 0.05


# ---------------------------------------------------------------- bad inputs (no kernel) ----


@pytest.fixture
def no_kernel(monkeypatch):
    """Any kernel (or the reference) running fails the test."""

    def ran(*args, **kwargs):
        raise AssertionError("a kernel ran before the error")

    monkeypatch.setattr(flash_module, "_kernel_forward", ran)
    monkeypatch.setattr(flash_module, "_reference", ran)
    monkeypatch.setattr(functional_module, "_reference", ran)
    monkeypatch.setattr(fused_module, "_reference", ran)
    monkeypatch.setattr(fused_module, "triton_attention_fwd", ran)


BAD_SINKS = {
    "H-1-1": (lambda: torch.zeros(3, 1, 1), {}, ValueError, r"shape \[H\] = \[3\]"),
    "too-many-heads": (lambda: torch.zeros(4), {}, ValueError, r"shape \[H\] = \[3\]"),
    "0-dim": (lambda: torch.tensor(0.5), {}, ValueError, r"shape \[H\]"),
    "B-H": (lambda: torch.zeros(2, 3), {}, ValueError, r"shape \[H\]"),
    "int": (lambda: torch.zeros(3, dtype=torch.int64), {}, TypeError, "float tensor"),
    "bool": (lambda: torch.zeros(3, dtype=torch.bool), {}, TypeError, "float tensor"),
    "list": (lambda: [0.0, 0.0, 0.0], {}, TypeError, r"torch\.Tensor"),
    "float": (lambda: 1.0, {}, TypeError, r"torch\.Tensor"),
    "device": (lambda: torch.zeros(3, device="meta"), {}, ValueError, "is on meta"),
    "nan": (lambda: torch.tensor([0.0, math.nan, 0.0]), {}, ValueError, "NaN or \\+inf"),
    "inf": (lambda: torch.tensor([0.0, math.inf, 0.0]), {}, ValueError, "NaN or \\+inf"),
    "with-n": (lambda: torch.zeros(3), {"softmax_n_param": 1.0}, ValueError, "mutually exclusive"),
    "with-n-0": (lambda: torch.zeros(3), {"softmax_n_param": 0.0}, ValueError, "mutually"),
    "with-n-tensor": (
        lambda: torch.zeros(3),
        {"softmax_n_param": torch.ones(3, 1, 1)},
        ValueError,
        "mutually exclusive",
    ),
}
ALL_FNS = [slow_attention_n, flash_attention_n, flash_attention_n_triton]


@pytest.mark.parametrize("fn", ALL_FNS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", list(BAD_SINKS))
def test_bad_sinks_are_refused_before_any_kernel(fn, case, no_kernel):
    """The Triton path checks the sink before the device, so this runs without the
    interpreter too."""
    build, kw, exc, pattern = BAD_SINKS[case]
    q, k, v, _ = make(dtype=torch.float32)
    with pytest.raises(exc, match=pattern):
        fn(q, k, v, sink=build(), **kw)


def test_attention_fn_checks_what_it_can_at_once():
    with pytest.raises(ValueError, match="mutually exclusive"):
        softmax_n_attention_fn(1.0, sink=torch.zeros(3))
    with pytest.raises(TypeError, match="float tensor"):
        softmax_n_attention_fn(sink=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="NaN"):
        softmax_n_attention_fn(sink=torch.tensor([math.nan]))
    q, k, v, _ = make()
    with pytest.raises(ValueError, match=r"\[H\] = \[3\]"):  # the shape needs the input
        softmax_n_attention_fn(sink=torch.zeros(2, dtype=torch.float64))(q, k, v)


def test_meta_tensors_with_a_sink_give_the_output_shape():
    q, k = torch.empty(2, 4, 5, 8, device="meta"), torch.empty(2, 2, 7, 8, device="meta")
    v, sink = torch.empty(2, 2, 7, 12, device="meta"), torch.empty(4, device="meta")
    for fn in ALL_FNS:
        out = fn(q, k, v, is_causal=True, sink=sink)
        assert out.device.type == "meta" and out.shape == (2, 4, 5, 12), fn.__name__


# ---------------------------------------------------------------- Triton interpreter (CPU) ---


def triton_check(q, k, v, sink, causal, tol):
    out = flash_attention_n_triton(q, k, v, is_causal=causal, sink=sink)
    assert out.dtype == q.dtype
    check(out, direct_attention_n(q, k, v, sink=sink, causal=causal), (q, k, v, sink), tol)
    return out


@pytest.mark.interpret
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    ("length", "s", "hk"), [(19, 23, 3), (21, 21, 1), (23, 17, 3)], ids=["L<S", "L==S", "L>S"]
)
def test_interpret_matches_oracle(causal, length, s, hk):
    """float32 without TF32 (IEEE dots): 1e-5; L > S causal has rows that see no key."""
    q, k, v, sink = make(b=1, hk=hk, length=length, s=s, d=16, dtype=torch.float32)
    out = triton_check(q, k, v, sink, causal, 1e-5)
    if causal and length > s:
        assert torch.all(out[:, :, : length - s] == 0)


@pytest.mark.interpret
def test_interpret_half_value_dim_three_dim_kv_and_sink_dtypes():
    q, k, v, sink = make(b=1, h=2, hk=1, length=18, s=18, d=32, sink=[0.5, 3.0])
    q, k, v = (t.detach().half().requires_grad_() for t in (q, k, v))
    triton_check(q, k, v, sink, True, 1e-2)  # float64 sink, float16 inputs
    k3, v3 = (t.detach()[:, 0].requires_grad_() for t in (k, v))  # [B, S, D] shared by heads
    triton_check(q, k3, v3, sink, False, 1e-2)
    q, k, _, _ = make(b=1, h=2, hk=2, length=9, s=12, d=8, dtype=torch.float32)
    v = torch.randn(1, 2, 12, 40, generator=torch.Generator().manual_seed(3)).requires_grad_()
    sink = torch.tensor([-2.0, 1.0], dtype=torch.bfloat16, requires_grad=True)
    triton_check(q, k, v, sink, True, 1e-5)  # Dv != D, bfloat16 sink


@pytest.mark.interpret
def test_interpret_large_and_minus_inf_sinks_and_no_keys():
    """Sinks and scores ~100 (beyond ``log(float32 max)``), ``-inf`` sinks (plain softmax, zero
    gradient) and ``S = 0`` (zeros)."""
    q, k, v, sink = make(b=1, length=9, s=11, d=16, dtype=torch.float32, sink=[100.0, 0.0, -80.0])
    out = flash_attention_n_triton(q, k, v, is_causal=True, sink=sink, scale=40.0)
    expected = direct_attention_n(q, k, v, sink=sink, causal=True, scale=40.0)
    for h in range(3):
        assert rel_err(out[:, h], expected[:, h]) < 1e-4, h
    off = torch.tensor([-math.inf, 0.0, -math.inf], requires_grad=True)
    out = flash_attention_n_triton(q, k, v, sink=off)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out[:, [0, 2]], sdpa[:, [0, 2]])
    (d_sink,) = torch.autograd.grad(out.sum(), off)
    assert d_sink[0] == 0 and d_sink[2] == 0 and d_sink[1] != 0
    empty = k[:, :, :0]  # S = 0: zeros, zero sink gradient
    out = flash_attention_n_triton(q, empty, empty, sink=sink)
    assert torch.equal(out, torch.zeros_like(q))
    (d_sink,) = torch.autograd.grad(out.sum(), sink)
    assert torch.equal(d_sink, torch.zeros_like(sink))


@pytest.mark.interpret
def test_interpret_bfloat16_falls_back_with_the_sink():
    q, k, v, sink = make(b=1, length=9, s=12, d=16, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="bfloat16"):
        out = flash_attention_n_triton(q, k, v, is_causal=True, sink=sink)
    assert rel_err(out, direct_attention_n(q, k, v, sink=sink, causal=True)) < 2e-2
    out.float().sum().backward()
    assert sink.grad is not None and torch.isfinite(sink.grad).all()


def row_kernel_inputs(device, dtype, lse_4d, seed=0):
    """``out [2, 3, 37, 24]`` (a strided view), ``lse`` with rows at ``-inf`` (no key seen) and
    at large magnitude, the sinks (one of them ``-inf``: no sink) and an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(2, 37, 3, 24, generator=g, dtype=torch.float64)
    out = base.to(device, dtype).transpose(1, 2)  # not contiguous
    lse = torch.randn(2, 3, 37, generator=g, dtype=torch.float64) * 4
    lse[0, 1, :3] = lse[1, 2, :2] = -math.inf
    lse[1, 2, 5] = 80.0
    lse = lse.to(device, torch.float32)
    lse = lse.unsqueeze(-1) if lse_4d else lse
    sink = torch.tensor([-1.0, 3.0, -math.inf], device=device)
    grad = torch.randn(2, 3, 37, 24, generator=g, dtype=torch.float64).to(device, dtype)
    return out, lse, sink, grad


def row_kernel_oracle(out, lse, c, grad):
    """float64: ``out * sigmoid(lse - c)``, ``logaddexp(lse, c)`` and the sink gradient
    ``-sum rowsum(grad * out_n) * sigmoid(c - lse)`` per head (``c`` per head, ``[H]``)."""
    lse4 = (lse if lse.dim() == 4 else lse.unsqueeze(-1)).double()
    c4 = c.double().view(1, -1, 1, 1)
    gate = torch.where(c4 == -math.inf, 1.0, torch.sigmoid(lse4 - c4))
    out_n = out.double() * gate
    lse_n = torch.where(c4 == -math.inf, lse4, torch.logaddexp(lse4, c4))
    w = torch.where(c4 == -math.inf, 0.0, torch.sigmoid(c4 - lse4))
    d_c = -((grad.double() * out_n).sum(-1, keepdim=True) * w).sum((0, 2, 3))
    return out_n, lse_n.reshape(lse.shape), d_c


def check_row_kernels(device, dtype, lse_4d, tol):
    from softmax_n.triton_kernels import gate_rows, sink_grad

    out, lse, sink, grad = row_kernel_inputs(device, dtype, lse_4d)
    want_out, want_lse_n, want_d_sink = row_kernel_oracle(out, lse, sink, grad)
    lse_n = gate_rows(out, lse, sink)  # out scaled in place
    assert lse_n.shape == lse.shape and lse_n.dtype == torch.float32
    assert rel_err(out, want_out) < tol
    assert torch.equal(torch.isinf(lse_n), torch.isinf(want_lse_n))
    finite = torch.isfinite(want_lse_n)
    assert torch.allclose(lse_n[finite].double(), want_lse_n[finite], rtol=1e-6, atol=1e-5)
    d_sink = sink_grad(out, grad, lse_n, sink)
    assert d_sink.shape == (3,) and d_sink[2] == 0  # no sink: no gradient
    assert rel_err(d_sink, want_d_sink) < tol
    assert torch.equal(d_sink, sink_grad(out, grad, lse_n, sink))  # fixed summation order
    # without sinks: c = log n as a number (-inf: n = 0, out and lse unchanged)
    for log_n in (math.log(0.5), -math.inf):
        out2 = row_kernel_inputs(device, dtype, lse_4d)[0]
        c = torch.full((3,), log_n, device=device)
        want_out, want_lse_n, _ = row_kernel_oracle(out2, lse, c, grad)
        lse_n = gate_rows(out2, lse, None, log_n)
        assert rel_err(out2, want_out) < tol
        assert torch.allclose(lse_n[finite].double(), want_lse_n[finite], rtol=1e-6, atol=1e-5)


@pytest.mark.interpret
@pytest.mark.parametrize("lse_4d", [False, True], ids=["lse-BHL", "lse-BHL1"])
def test_interpret_gate_and_sink_gradient_row_kernels(lse_4d):
    """float32 rows, float32 sums of 24 products: 1e-6."""
    check_row_kernels("cpu", torch.float32, lse_4d, 1e-6)


# ---------------------------------------------------------------- CUDA -----------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("backend", "d"), [("cudnn", 64), ("cudnn", 128), ("flash", 64)])
def test_cuda_fused_kernels(dtype, causal, backend, d, monkeypatch):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backend == "cudnn" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("cuDNN attention is used from compute capability 9.0")
    used = []
    kernel_forward = flash_module._kernel_forward
    monkeypatch.setattr(
        flash_module,
        "_kernel_forward",
        lambda name, *a: used.append(name) or kernel_forward(name, *a),
    )
    q, k, v, _ = make(b=2, h=4, hk=2, length=130, s=130, d=d)
    q, k, v = (t.detach().cuda().to(dtype).requires_grad_() for t in (q, k, v))
    sink = torch.tensor([-1.0, 0.0, 1.0, 3.0], device="cuda", requires_grad=True)  # fp32
    sdpa_backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    with sdpa_kernel([sdpa_backend[backend]]):
        out = flash_attention_n(q, k, v, is_causal=causal, sink=sink)
        assert used == [backend]
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-2
        check(out, direct_attention_n(q, k, v, sink=sink, causal=causal), (q, k, v, sink), tol)


@pytest.mark.gpu
@pytest.mark.parametrize("lse_4d", [False, True], ids=["lse-BHL", "lse-BHL1"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_gate_and_sink_gradient_row_kernels(dtype, lse_4d):
    """bfloat16 rows are rounded once after the gate: 1e-2; float32: 1e-6."""
    check_row_kernels("cuda", dtype, lse_4d, 1e-2 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("length", "s", "causal"), [(300, 300, True), (200, 333, True), (257, 130, False)]
)
def test_cuda_triton_kernel(dtype, length, s, causal):
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]
    q, k, v, _ = make(b=2, h=4, hk=2, length=length, s=s, d=64)
    q, k, v = (t.detach().cuda().to(dtype).requires_grad_() for t in (q, k, v))
    sink = torch.tensor([-1.0, 0.0, 1.0, 3.0], device="cuda", requires_grad=True)
    out = flash_attention_n_triton(q, k, v, is_causal=causal, sink=sink)
    check(out, direct_attention_n(q, k, v, sink=sink, causal=causal), (q, k, v, sink), tol)


@pytest.mark.gpu
def test_cuda_triton_compile_fullgraph():
    q, k, v, _ = make(b=2, h=4, hk=4, length=128, s=128, d=64)
    q, k, v = (t.detach().cuda().bfloat16().requires_grad_() for t in (q, k, v))
    sink = torch.zeros(4, device="cuda", requires_grad=True)
    fn = torch.compile(
        lambda q, k, v, s: flash_attention_n_triton(q, k, v, is_causal=True, sink=s),
        fullgraph=True,
    )
    out = fn(q, k, v, sink)
    assert rel_err(out, direct_attention_n(q, k, v, sink=sink, causal=True)) < 2e-2
    out.float().sum().backward()
    assert sink.grad is not None and torch.isfinite(sink.grad).all()


# ---------------------------------------------------------------- gpt-oss's s_aux ------------


def gpt_oss(transformers):
    cfg = transformers.GptOssConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():  # sinks large enough to matter (the init is ~0.02)
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.tensor([-2.0, 0.0, 1.0, 3.0]))
    return model


def test_gpt_oss_sinks_match_eager_attention():
    """transformers' own eager attention (softmax with the sink column) against the converted
    model: logits (valid positions, with padding and a sliding-window layer) and the sinks'
    gradients within float32 tolerance; the sinks were dropped before."""
    transformers = pytest.importorskip("transformers")
    from softmax_n.surgery import apply_attention_softmax_n

    model = gpt_oss(transformers)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    valid = mask.bool()
    sinks = [layer.self_attn.sinks for layer in model.model.layers]

    def run():
        logits = model(ids, attention_mask=mask).logits
        return logits.detach(), torch.autograd.grad(logits[valid].sum(), sinks)

    with torch.no_grad():
        want_no_mask = model(ids).logits
    want, want_grads = run()
    assert apply_attention_softmax_n(model, 0.0) == [""]
    got, got_grads = run()
    torch.testing.assert_close(got[valid], want[valid])
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # without a mask (transformers may then pass is_causal) too
        torch.testing.assert_close(model(ids).logits, want_no_mask)
        model.config.softmax_n_param = 1.0  # a sink and n > 0: refused
        with pytest.raises(ValueError, match="s_aux"):
            model(ids)
