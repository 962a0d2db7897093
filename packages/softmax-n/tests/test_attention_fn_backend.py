"""``softmax_n_attention_fn(..., backend=)``: the op each backend runs, against the float64 oracle,
and the errors (an unknown backend at construction, what the Triton kernel cannot take at the
call). The Triton choice runs under ``TRITON_INTERPRET=1`` on CPU (``interpret``) and on CUDA
(``gpu``)."""

from __future__ import annotations

import pytest
import torch
from softmax_n import flash_attention_n, slow_attention_n, softmax_n_attention_fn
from softmax_n.testing import direct_attention_n

from testing_support import BACKENDS, DEVICES, assert_rel_close

# numpy's warnings from the interpreter: log2(0) = -inf for n = 0, 0/0 for rows without keys
pytestmark = pytest.mark.filterwarnings(
    "ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning"
)


def make(device, dtype=torch.float32, b=2, h=4, length=9, s=11, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()
    return t(b, h, length, d), t(b, h, s, d), t(b, h, s, d)


def spy(monkeypatch, module, name):
    """Wrap ``module.name`` so that its calls are counted (patch before the factory runs)."""
    calls = []
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.mark.parametrize("backend", ["fused", "auto", "Triton", "", True, 1])
def test_unknown_backend_raises_at_construction(backend):
    with pytest.raises(ValueError, match="backend must be None, 'reference' or 'triton'"):
        softmax_n_attention_fn(1.0, backend=backend)


def test_backend_is_keyword_only():
    with pytest.raises(TypeError):
        softmax_n_attention_fn(1.0, None, "reference")  # type: ignore[misc]


@pytest.mark.parametrize("device", DEVICES)
def test_default_is_flash_attention_n(device, monkeypatch):
    """``backend=None`` (and no backend) keeps what the hook did before: ``flash_attention_n``."""
    from softmax_n import flash

    calls = spy(monkeypatch, flash, "flash_attention_n")
    q, k, v = make(device)
    keep = torch.ones(9, 11, dtype=torch.bool, device=device).tril(2)
    for fn in (softmax_n_attention_fn(0.5), softmax_n_attention_fn(0.5, backend=None)):
        out = fn(q, k, v, attn_mask=keep, scale=0.3)
        assert torch.equal(out, flash_attention_n(q, k, v, 0.5, scale=0.3, attn_mask=keep)), (
            "not bitwise flash_attention_n"
        )
    assert calls == ["flash_attention_n"] * 2


def test_reference_runs_slow_attention_n_with_mask_and_dropout(monkeypatch):
    from softmax_n import functional

    calls = spy(monkeypatch, functional, "slow_attention_n")
    fn = softmax_n_attention_fn(1.0, backend="reference")
    q, k, v = make("cpu", torch.float64)
    keep = torch.rand(9, 11, generator=torch.Generator().manual_seed(1)) > 0.3
    out = fn(q, k, v, attn_mask=keep, is_causal=False, scale=0.25)
    expected = direct_attention_n(q, k, v, 1.0, keep, scale=0.25)
    assert_rel_close(out, expected, kind="attention")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(expected, (q, k, v), g)
    for name, a, b in zip("qkv", got, want):
        assert_rel_close(a, b, kind="attention", msg=name)
    torch.manual_seed(0)
    dropped = fn(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    assert torch.equal(dropped, slow_attention_n(q, k, v, dropout_p=0.5, softmax_n_param=1.0))
    assert not torch.allclose(dropped, fn(q, k, v))
    assert calls == ["slow_attention_n"] * 3


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("case", ["n", "per-head-n", "sink"])
@pytest.mark.parametrize("causal", [False, True])
def test_each_backend_matches_the_oracle(backend, device, case, causal):
    """Forward and every gradient (q, k, v and a tensor ``n`` or the sink) against float64."""
    q, k, v = make(device)
    n: float | torch.Tensor | None = None
    sink = None
    if case == "n":
        n = 1.0
    elif case == "per-head-n":
        n = torch.tensor([0.0, 0.5, 1.0, 3.0], device=device).view(4, 1, 1).requires_grad_()
    else:
        sink = torch.tensor([0.5, -0.5, 1.0, 2.0], device=device).requires_grad_()
    out = softmax_n_attention_fn(n, sink, backend=backend)(q, k, v, is_causal=causal)
    assert out.shape == (2, 4, 9, 16) and out.dtype == torch.float32
    expected = direct_attention_n(q, k, v, 0.0 if n is None else n, causal=causal, sink=sink)
    assert_rel_close(out, expected, dtype=torch.float32, kind="attention")
    leaves = (q, k, v, n if sink is None else sink)
    leaves = tuple(t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    want = torch.autograd.grad(expected, leaves, g.double())
    for name, a, b in zip(["q", "k", "v", case], got, want):
        assert_rel_close(a, b, 3e-5, msg=name)


@pytest.mark.interpret
def test_interpret_triton_runs_flash_attention_n_triton(monkeypatch):
    from softmax_n import fused

    calls = spy(monkeypatch, fused, "flash_attention_n_triton")
    q, k, v = make("cpu")
    out = softmax_n_attention_fn(1.0, backend="triton")(q, k, v, is_causal=True)
    assert calls == ["flash_attention_n_triton"]
    assert_rel_close(out, direct_attention_n(q, k, v, 1.0, causal=True), kind="attention")


@pytest.mark.parametrize(
    ("options", "given"),
    [
        ({"attn_mask": torch.ones(9, 11, dtype=torch.bool)}, "an attn_mask"),
        ({"dropout_p": 0.1}, "dropout_p=0.1"),
    ],
)
def test_triton_refuses_masks_and_dropout_before_any_kernel(options, given, monkeypatch):
    from softmax_n import fused

    calls = spy(monkeypatch, fused, "flash_attention_n_triton")
    fn = softmax_n_attention_fn(1.0, backend="triton")
    with pytest.raises(ValueError, match=f"takes no attn_mask and no dropout, got {given}"):
        fn(*make("cpu"), **options)
    assert calls == []


def test_triton_raises_where_it_cannot_run(monkeypatch):
    fn = softmax_n_attention_fn(1.0, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        fn(*make("cpu", torch.float64))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        fn(*make("cpu"))
