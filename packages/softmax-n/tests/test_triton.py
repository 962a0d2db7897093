"""The fused Triton kernel ``flash_attention_n_triton`` against the float64 formula of
``softmax_n.testing``: under ``TRITON_INTERPRET=1`` on CPU (small shapes, ``interpret`` marker)
and on CUDA (``gpu`` marker); plus its input validation, which runs before any kernel.

Tolerances (relative Frobenius error against float64): float32 runs without TF32 (IEEE dots), so
its error is a few float32 roundings amplified by the length of the sums: 1e-5 for outputs, 3x for
gradients (one more matmul chain). float16/bfloat16 round inputs and the probabilities fed to the
second matmul to 8-11 bits: 1e-2 (2e-2 for bfloat16's 8-bit mantissa), 3x for gradients.
"""

from __future__ import annotations

import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from softmax_n import flash_attention_n_triton, slow_attention_n
from softmax_n.testing import direct_attention_n

from testing_support import rel_error as rel_err

# numpy's warnings from the interpreter: log2(0) = -inf for n = 0, 0/0 for rows without keys
pytestmark = pytest.mark.filterwarnings(
    "ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning"
)

N_VALUES = [0.0, 1e-3, 0.5, 1.0, 3.0, 100.0]


def make(b, h, hk, length, s, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()
    return t(b, h, length, d), t(b, hk, s, d), t(b, hk, s, d)


def check(q, k, v, n, causal, tol):
    """Output and gradients (q, k, v and a tensor n that requires grad) against float64."""
    out = flash_attention_n_triton(q, k, v, softmax_n_param=n, is_causal=causal)
    assert out.shape == (*q.shape[:-1], v.shape[-1]) and out.dtype == q.dtype
    rep = q.shape[1] // k.shape[1]
    kf, vf = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    expected = direct_attention_n(q, kf, vf, n, causal=causal)
    assert rel_err(out, expected) < tol
    g = torch.randn_like(out)
    leaves = (q, k, v) + ((n,) if isinstance(n, torch.Tensor) and n.requires_grad else ())
    got = torch.autograd.grad(out, leaves, g)
    want = torch.autograd.grad(expected, leaves, g.double())
    for name, a, b in zip("qkvn", got, want):
        assert rel_err(a, b) < 3 * tol, name


# ---------------------------------------------------------------- interpreter (CPU) ----------


@pytest.mark.interpret
@pytest.mark.parametrize("n", N_VALUES)
@pytest.mark.parametrize(("length", "s"), [(19, 23), (21, 21)], ids=["L<S", "L==S"])
def test_interpret_n_values_causal(n, length, s):
    check(*make(1, 2, 2, length, s, 16, torch.float32, "cpu"), n, causal=True, tol=1e-5)


@pytest.mark.interpret
@pytest.mark.parametrize(
    ("length", "s", "hk", "causal"),
    [
        (20, 37, 1, True),  # L < S, shared key/value head
        (37, 20, 3, True),  # L > S: the first 17 rows see no key (0 for n > 0)
        (33, 33, 3, False),
        (5, 40, 3, False),
    ],
)
def test_interpret_shapes_gqa_learnable_per_head_n(length, s, hk, causal):
    n = torch.tensor([0.1, 1.0, 5.0]).view(3, 1, 1).requires_grad_()
    check(*make(2, 3, hk, length, s, 24, torch.float32, "cpu"), n, causal=causal, tol=1e-5)


@pytest.mark.interpret
def test_interpret_half_precision_and_three_dim_kv():
    q, k, v = make(1, 2, 1, 18, 18, 32, torch.float16, "cpu")
    check(q, k, v, 1.0, causal=True, tol=1e-2)
    k3, v3 = (t.detach()[:, 0].requires_grad_() for t in (k, v))  # [B, S, D] shared by heads
    out = flash_attention_n_triton(q, k3, v3, softmax_n_param=0.5)
    expected = direct_attention_n(q, k.expand(1, 2, 18, 32), v.expand(1, 2, 18, 32), 0.5)
    assert rel_err(out, expected) < 1e-2
    out.float().sum().backward()
    assert k3.grad.shape == k3.shape and torch.isfinite(k3.grad).all()


@pytest.mark.interpret
def test_interpret_head_dim_256_and_scale():
    q, k, v = make(1, 1, 1, 17, 9, 256, torch.float32, "cpu")
    out = flash_attention_n_triton(q, k, v, softmax_n_param=2.0, scale=0.3)
    expected = slow_attention_n(q.double(), k.double(), v.double(), scale=0.3, softmax_n_param=2.0)
    assert rel_err(out, expected) < 1e-5
    check(q, k, v, 1.0, causal=False, tol=1e-5)


@pytest.mark.interpret
def test_interpret_rows_without_keys():
    """L > S causal: rows that see no key are 0 with zero gradients for every n (n = 0 included,
    as F.scaled_dot_product_attention; it was NaN there), also with S = 0."""
    q, k, v = make(1, 1, 1, 6, 3, 16, torch.float32, "cpu")
    for n in (1.0, 0.0):
        out = flash_attention_n_triton(q, k, v, softmax_n_param=n, is_causal=True)
        assert torch.all(out[:, :, :3] == 0) and torch.isfinite(out).all()
        dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
        assert (
            torch.all(dq[:, :, :3] == 0) and torch.isfinite(dk).all() and torch.isfinite(dv).all()
        )
    empty = k[:, :, :0]
    for n in (1.0, 0.0):
        assert torch.equal(flash_attention_n_triton(q, empty, empty, n), torch.zeros_like(q))


@pytest.mark.interpret
@pytest.mark.parametrize(
    ("length", "s", "d", "dv", "hk", "causal"),
    [(19, 23, 16, 40, 1, True), (21, 21, 24, 8, 2, False), (37, 20, 8, 72, 2, True)],
)
def test_interpret_value_head_dim_differs(length, s, d, dv, hk, causal):
    """MLA-style ``Dv != D`` in the kernels (forward and backward, n per head)."""
    q, k, _ = make(2, 2, hk, length, s, d, torch.float32, "cpu")
    v = torch.randn(2, hk, s, dv, generator=torch.Generator().manual_seed(1)).requires_grad_()
    n = torch.tensor([0.5, 2.0]).view(2, 1, 1).requires_grad_()
    check(q, k, v, n, causal=causal, tol=1e-5)


@pytest.mark.interpret
def test_interpret_bfloat16_falls_back_to_the_reference():
    """The interpreter has no bfloat16 (numpy): the kernels returned garbage (relative error
    ~1e9); the reference runs instead, with a warning."""
    q, k, v = make(1, 2, 1, 9, 12, 16, torch.bfloat16, "cpu")
    with pytest.warns(UserWarning, match="bfloat16"):
        out = flash_attention_n_triton(q, k, v, softmax_n_param=1.0, is_causal=True)
    assert out.dtype == torch.bfloat16
    expected = direct_attention_n(q, k.expand(1, 2, 12, 16), v.expand(1, 2, 12, 16), 1.0,
                                  causal=True)  # fmt: skip
    assert rel_err(out, expected) < 2e-2
    out.float().sum().backward()
    assert torch.isfinite(k.grad).all()


@pytest.mark.interpret
@settings(max_examples=5, deadline=None)
@given(
    length=st.integers(1, 35),
    s=st.integers(1, 35),
    d=st.sampled_from([8, 40, 72]),
    causal=st.booleans(),
    n=st.sampled_from([0.5, 2.0]),
)
def test_interpret_fuzz_lengths_and_head_dims(length, s, d, causal, n):
    check(*make(1, 2, 1, length, s, d, torch.float32, "cpu"), n, causal=causal, tol=1e-5)


# ---------------------------------------------------------------- validation (no kernel) -----


def test_clear_errors_before_any_kernel():
    q, k, v = (t.detach() for t in make(1, 2, 2, 4, 4, 8, torch.float32, "cpu"))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        flash_attention_n_triton(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="one dtype"):
        flash_attention_n_triton(q, k.half(), v)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        flash_attention_n_triton(q.numpy(), k, v)
    with pytest.raises(ValueError, match=r"\[B, H, L, D\]"):
        flash_attention_n_triton(q[0], k, v)
    with pytest.raises(ValueError, match="do not divide"):
        flash_attention_n_triton(q, k[:, :1].expand(1, 3, 4, 8), v[:, :1].expand(1, 3, 4, 8))
    with pytest.raises(ValueError, match="head dim"):
        flash_attention_n_triton(q, k[..., :4], v)
    with pytest.raises(ValueError, match="head dim"):
        big = torch.randn(1, 1, 4, 264)
        flash_attention_n_triton(big, big, big)
    with pytest.raises(ValueError, match="batch"):
        flash_attention_n_triton(q, torch.cat([k, k]), torch.cat([v, v]))
    with pytest.raises(ValueError, match="same heads and length"):
        flash_attention_n_triton(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="n >= 0"):
        flash_attention_n_triton(q, k, v, softmax_n_param=-1.0)
    with pytest.raises(ValueError, match="n >= 0"):
        flash_attention_n_triton(q, k, v, softmax_n_param=torch.tensor([1.0, -1.0]).view(2, 1, 1))
    with pytest.raises(ValueError, match="broadcast"):
        flash_attention_n_triton(q, k, v, softmax_n_param=torch.ones(3, 1, 1))
    with pytest.raises(TypeError, match="softmax_n_param"):
        flash_attention_n_triton(q, k, v, softmax_n_param="1")


def test_meta_tensors_give_the_output_shape():
    """Meta tensors (shapes only) go to the reference; they were refused as a device."""
    q, k = torch.empty(2, 4, 5, 8, device="meta"), torch.empty(2, 2, 7, 8, device="meta")
    v = torch.empty(2, 2, 7, 12, device="meta")
    out = flash_attention_n_triton(q, k, v, torch.ones(4, 1, 1, device="meta"), is_causal=True)
    assert out.device.type == "meta" and out.shape == (2, 4, 5, 12)


@pytest.mark.parametrize(
    ("dtype", "capability", "falls_back"),
    [
        (torch.bfloat16, (7, 5), True),
        (torch.bfloat16, (8, 0), False),
        (torch.float16, (7, 5), False),
        (torch.float32, (7, 0), False),
    ],
)
def test_bfloat16_before_ampere_falls_back(monkeypatch, dtype, capability, falls_back):
    from softmax_n import fused

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    query = types.SimpleNamespace(dtype=dtype, device=torch.device("cuda"))
    reason = fused._fallback_reason(query)
    assert (reason is not None) == falls_back
    if falls_back:
        assert "8.0" in reason and "Ampere" in reason


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = make(1, 2, 2, 4, 4, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        flash_attention_n_triton(q, k, v, softmax_n_param=1.0)


# ---------------------------------------------------------------- CUDA -----------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [64, 128, 256, 80])
@pytest.mark.parametrize(
    ("length", "s", "causal"), [(300, 300, True), (200, 333, True), (257, 130, False)]
)
def test_cuda_triton_kernel(dtype, d, length, s, causal):
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]
    n = torch.tensor([0.5, 1.0, 3.0, 10.0], device="cuda").view(4, 1, 1).requires_grad_()
    check(*make(2, 4, 2, length, s, d, dtype, "cuda"), n, causal=causal, tol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("n", N_VALUES)
def test_cuda_n_values(n):
    check(*make(2, 4, 4, 190, 250, 64, torch.bfloat16, "cuda"), n, causal=True, tol=2e-2)


@pytest.mark.gpu
def test_cuda_three_dim_kv_and_strided_inputs():
    q, k, v = make(2, 4, 1, 128, 128, 64, torch.float16, "cuda")
    qt = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # [B, L, H, D]
    k3, v3 = (t.detach()[:, 0].requires_grad_() for t in (k, v))
    out = flash_attention_n_triton(qt, k3, v3, softmax_n_param=1.0, is_causal=True)
    expected = direct_attention_n(q, k.expand(2, 4, 128, 64), v.expand(2, 4, 128, 64), 1.0,
                                  causal=True)  # fmt: skip
    assert rel_err(out, expected) < 1e-2


@pytest.mark.gpu
def test_cuda_compile_fullgraph():
    q, k, v = make(2, 4, 4, 128, 128, 64, torch.bfloat16, "cuda")
    n = torch.full((4, 1, 1), 0.5, device="cuda", requires_grad=True)
    fn = torch.compile(
        lambda q, k, v, n: flash_attention_n_triton(q, k, v, n, is_causal=True), fullgraph=True
    )
    out = fn(q, k, v, n)
    expected = direct_attention_n(q, k, v, n, causal=True)
    assert rel_err(out, expected) < 2e-2
    out.float().sum().backward()
    assert n.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.gpu
def test_cuda_more_than_2_31_elements():
    """64-bit offsets: 2^31 + 2^20 elements per tensor (4 GiB each in bfloat16); the last head
    is compared with the reference."""
    h, length, d = 32768 + 16, 1024, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(1, h, length, d, device="cuda", dtype=torch.bfloat16, generator=g)
        for _ in range(3)
    )
    out = flash_attention_n_triton(q, k, v, softmax_n_param=1.0, is_causal=True)
    expected = direct_attention_n(q[:, -2:], k[:, -2:], v[:, -2:], 1.0, causal=True)
    assert rel_err(out[:, -2:], expected) < 2e-2


def test_old_registration_module_name_is_a_deprecated_alias():
    import importlib
    import sys

    from softmax_n import custom_ops

    sys.modules.pop("softmax_n.ops", None)
    with pytest.warns(DeprecationWarning, match="softmax_n.custom_ops"):
        old = importlib.import_module("softmax_n.ops")
    assert old.triton_attention_fwd is custom_ops.triton_attention_fwd
    assert old.triton_attention_bwd is custom_ops.triton_attention_bwd
