"""Bad and edge-case inputs of the attention functions (issue #15), as a matrix of cases.

Each case either raises a clear ``TypeError``/``ValueError`` before any kernel runs (the kernels
and the reference are replaced by a function that fails the test if it is called), or returns
what the float64 reference written out below returns: ``softmax_n(x) = exp(x) / (n + sum exp(x))``
per row (computed relative to the row's largest logit, which changes nothing but the range of
the exponentials), 0 for a row that sees no key (as ``F.scaled_dot_product_attention``).

``flash_attention_n`` and ``slow_attention_n`` run every case on CPU; ``flash_attention_n_triton``
runs the refused cases everywhere (its checks precede the device check) and the accepted ones
that take no mask, bias or dropout under ``TRITON_INTERPRET=1`` (``interpret`` marker).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import softmax_n.flash as flash_module
import softmax_n.functional as functional_module
import softmax_n.fused as fused_module
import torch
from softmax_n import flash_attention_n, flash_attention_n_triton, slow_attention_n

pytestmark = pytest.mark.filterwarnings(
    "ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning"
)

B, H, L, S, D = 2, 2, 3, 5, 8
FNS = {"flash": flash_attention_n, "slow": slow_attention_n, "triton": flash_attention_n_triton}
TOL = {  # (rtol, atol) against float64
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def reference(q, k, v, n=0.0, mask=None, bias=None, scale=None, causal=False):
    """``exp(x) / (n + sum exp(x)) @ v`` in float64, ``x`` the scaled, masked, biased scores."""
    q, k, v = q.double(), k.double(), v.double()
    if k.dim() == 3:
        k, v = k.unsqueeze(1), v.unsqueeze(1)
    if k.shape[1] not in (0, q.shape[1]):
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
    if scale is None:
        scale = 1 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    x = q @ k.transpose(-1, -2) * scale
    keep = torch.ones(x.shape, dtype=torch.bool, device=x.device)
    if causal:
        n_q, n_k = x.shape[-2:]
        keep = keep & torch.ones(n_q, n_k, dtype=torch.bool, device=x.device).tril(n_k - n_q)
    for extra in (mask, bias):
        if extra is not None and extra.dtype == torch.bool:
            keep = keep & extra
        elif extra is not None:
            x = x + extra.double()
    keep = keep & (x != -math.inf)
    if x.shape[-1] == 0:
        return q.new_zeros(*q.shape[:-1], v.shape[-1])
    top = x.masked_fill(~keep, -math.inf).amax(-1, keepdim=True)
    top = torch.where(torch.isinf(top), 0.0, top)  # rows without keys (NaN rows stay NaN)
    e = torch.exp(x - top).masked_fill(~keep, 0.0)  # exp(x) * exp(-top)
    n = n.double() if isinstance(n, torch.Tensor) else float(n)
    den = e.sum(-1, keepdim=True) + torch.where(torch.as_tensor(n) > 0, n * torch.exp(-top), 0.0)
    return (e / torch.where(den == 0, 1.0, den)) @ v


def make(b=B, h=H, length=L, s=S, d=D, dv=None, hk=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    hk = h if hk is None else hk
    return t(b, h, length, d), t(b, hk, s, d), t(b, hk, s, d if dv is None else dv)


@dataclass
class Case:
    """``q, k, v`` and keyword arguments (``n`` is passed as ``softmax_n_param``)."""

    q: object
    k: object
    v: object
    kw: dict = field(default_factory=dict)
    fns: tuple = ("flash", "slow", "triton")


def case(q=None, k=None, v=None, fns=("flash", "slow", "triton"), **kw):
    q0, k0, v0 = make()
    return Case(q0 if q is None else q, k0 if k is None else k, v0 if v is None else v, kw, fns)


def mask_case(q=None, k=None, v=None, **kw):
    return case(q, k, v, fns=("flash", "slow"), **kw)


def _q(**kw):
    return make(**kw)[0]


def _keep():
    keep = torch.rand(L, S, generator=torch.Generator().manual_seed(1)) > 0.4
    keep[:, 0] = True
    return keep


# --------------------------------------------------------------------------------------------
# refused: (case, exception, message pattern)

q0, k0, v0 = make()
REFUSED = {
    # shapes
    "query-3d": (lambda: case(q=q0[0]), ValueError, r"\[B, H, L, D\]"),
    "query-5d": (lambda: case(q=q0[None]), ValueError, r"\[B, H, L, D\]"),
    "key-2d": (lambda: case(k=k0[0, 0]), ValueError, "key must be"),
    "value-5d": (lambda: case(v=v0[None]), ValueError, "value must be"),
    "kv-batch": (lambda: case(k=k0[:1], v=v0[:1]), ValueError, "batch"),
    "kv-heads-do-not-divide": (lambda: case(*make(h=4, hk=3)), ValueError, "do not divide"),
    "kv-zero-heads": (lambda: case(k=k0[:, :0], v=v0[:, :0]), ValueError, "do not divide"),
    "key-head-dim": (lambda: case(k=k0[..., :4]), ValueError, "head dim"),
    "kv-lengths": (lambda: case(v=v0[:, :, :4]), ValueError, "same heads and length"),
    "kv-heads-differ": (lambda: case(v=v0[:, :1]), ValueError, "same heads and length"),
    # dtypes and types
    "int-inputs": (lambda: case(*(t.int() for t in make())), TypeError, "float"),
    "bool-inputs": (lambda: case(*(t > 0 for t in make())), TypeError, "float"),
    "complex-inputs": (lambda: case(*(t.to(torch.complex64) for t in make())), TypeError, "float"),
    "mixed-dtypes": (lambda: case(k=k0.half()), TypeError, "one dtype"),
    "numpy-query": (lambda: case(q=q0.numpy()), TypeError, r"torch\.Tensor"),
    "list-key": (lambda: case(k=k0.tolist()), TypeError, r"torch\.Tensor"),
    "float64-triton": (
        lambda: Case(*make(dtype=torch.float64), fns=("triton",)),
        TypeError,
        "float16, bfloat16 or float32",
    ),
    "head-dim-264-triton": (
        lambda: Case(*make(d=264), fns=("triton",)),
        ValueError,
        "at most 256",
    ),
    "value-head-dim-300-triton": (
        lambda: Case(*make(dv=300), fns=("triton",)),
        ValueError,
        "at most 256",
    ),
    # devices
    "meta-key-cpu-query": (
        lambda: case(k=k0.to("meta"), v=v0.to("meta")),
        ValueError,
        "one device",
    ),
    "meta-mask-cpu-query": (
        lambda: mask_case(attn_mask=_keep().to("meta")),
        ValueError,
        "is on meta",
    ),
    # masks (SDPA's dtypes only) and biases
    "int32-mask": (lambda: mask_case(attn_mask=_keep().int()), TypeError, r"mask\.bool\(\)"),
    "int64-mask": (lambda: mask_case(attn_mask=_keep().long()), TypeError, r"mask\.bool\(\)"),
    "uint8-mask": (lambda: mask_case(attn_mask=_keep().to(torch.uint8)), TypeError, "bool"),
    "int8-mask": (lambda: mask_case(attn_mask=_keep().to(torch.int8)), TypeError, "bool"),
    "float64-mask-float32-query": (
        lambda: mask_case(attn_mask=torch.zeros(L, S, dtype=torch.float64)),
        TypeError,
        "query's dtype or float32",
    ),
    "float16-mask-float32-query": (
        lambda: mask_case(attn_mask=torch.zeros(L, S, dtype=torch.float16)),
        TypeError,
        "query's dtype or float32",
    ),
    "bfloat16-mask-float16-query": (
        lambda: mask_case(
            *make(dtype=torch.float16), attn_mask=torch.zeros(L, S, dtype=torch.bfloat16)
        ),
        TypeError,
        "query's dtype or float32",
    ),
    "complex-mask": (
        lambda: mask_case(attn_mask=torch.zeros(L, S, dtype=torch.complex64)),
        TypeError,
        "bool",
    ),
    "mask-wrong-length": (lambda: mask_case(attn_mask=_keep()[:, :4]), ValueError, "broadcast"),
    "mask-grows-batch": (
        lambda: mask_case(attn_mask=torch.ones(3, 1, L, S, dtype=torch.bool)),
        ValueError,
        "broadcast",
    ),
    "mask-5d": (
        lambda: mask_case(attn_mask=torch.ones(1, B, H, L, S, dtype=torch.bool)),
        ValueError,
        "broadcast",
    ),
    "mask-list": (lambda: mask_case(attn_mask=_keep().tolist()), TypeError, r"torch\.Tensor"),
    "bool-bias": (lambda: mask_case(attn_bias=_keep()), TypeError, "additive"),
    "int-bias": (lambda: mask_case(attn_bias=_keep().int()), TypeError, "additive"),
    "bias-wrong-shape": (
        lambda: mask_case(attn_bias=torch.zeros(H + 1, L, S)),
        ValueError,
        "broadcast",
    ),
    # n
    "n-nan": (lambda: case(n=float("nan")), ValueError, "finite n >= 0"),
    "n-inf": (lambda: case(n=float("inf")), ValueError, "finite n >= 0"),
    "n-negative": (lambda: case(n=-0.5), ValueError, "finite n >= 0"),
    "n-tensor-nan": (
        lambda: case(n=torch.tensor([1.0, float("nan")]).view(H, 1, 1)),
        ValueError,
        "finite n >= 0",
    ),
    "n-tensor-inf": (lambda: case(n=torch.tensor(float("inf"))), ValueError, "finite n >= 0"),
    "n-tensor-negative": (
        lambda: case(n=torch.tensor([1.0, -1.0]).view(H, 1, 1)),
        ValueError,
        "finite n >= 0",
    ),
    "n-per-head-1d": (lambda: case(n=torch.ones(H)), ValueError, "ambiguous"),
    "n-per-head-2d": (lambda: case(n=torch.ones(H, 1)), ValueError, "ambiguous"),
    "n-per-key": (lambda: case(n=torch.ones(H, 1, S)), ValueError, "last dim"),
    "n-wrong-heads": (lambda: case(n=torch.ones(H + 1, 1, 1)), ValueError, "broadcast"),
    "n-grows-batch": (
        lambda: case(*make(b=1), n=torch.ones(2, H, L, 1)),
        ValueError,
        "larger shape",
    ),
    "n-5d": (lambda: case(n=torch.ones(1, B, H, L, 1)), ValueError, "more than 4 dims"),
    "n-bool-tensor": (lambda: case(n=torch.tensor(True)), TypeError, "real float or integer"),
    "n-complex-tensor": (
        lambda: case(n=torch.tensor(1.0 + 0j)),
        TypeError,
        "real float or integer",
    ),
    "n-bool": (lambda: case(n=True), TypeError, "float or a tensor"),
    "n-string": (lambda: case(n="1"), TypeError, "float or a tensor"),
    "n-list": (lambda: case(n=[1.0, 1.0]), TypeError, "float or a tensor"),
    # scale and dropout
    "scale-nan": (lambda: case(scale=float("nan")), ValueError, "finite"),
    "scale-inf": (lambda: case(scale=float("inf")), ValueError, "finite"),
    "scale-string": (lambda: case(scale="0.5"), TypeError, "scale"),
    "scale-tensor": (lambda: case(scale=torch.tensor(0.5)), TypeError, "scale"),
    "dropout-above-1": (lambda: mask_case(dropout_p=1.5), ValueError, "dropout_p"),
    "dropout-negative": (lambda: mask_case(dropout_p=-0.1), ValueError, "dropout_p"),
    "dropout-string": (lambda: mask_case(dropout_p="0.1"), TypeError, "dropout_p"),
}


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


def run(fn_name, c: Case):
    """``fn(q, k, v, **kw)`` with the short names of the cases spelled out."""
    names = {"n": "softmax_n_param", "mask": "attn_mask", "bias": "attn_bias"}
    names["causal"] = "is_causal"
    return FNS[fn_name](c.q, c.k, c.v, **{names.get(k, k): x for k, x in c.kw.items()})


REFUSED_PARAMS = [
    pytest.param(name, fn, id=f"{name}-{fn}")
    for name, (build, _, _) in REFUSED.items()
    for fn in build().fns
]


@pytest.mark.parametrize(("name", "fn"), REFUSED_PARAMS)
def test_refused_before_any_kernel(name, fn, no_kernel):
    build, exc, pattern = REFUSED[name]
    with pytest.raises(exc, match=pattern):
        run(fn, build())


# --------------------------------------------------------------------------------------------
# accepted: the result equals the float64 reference


def _strided(t):
    """The same values with other strides: last two dims stored transposed."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _row_masked(dtype=torch.bool):
    keep = torch.ones(L, S, dtype=torch.bool)
    keep[1] = False
    if dtype == torch.bool:
        return keep
    return torch.zeros(L, S, dtype=dtype).masked_fill(~keep, -math.inf)


def _with(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def _far(shift):
    """A float64 bias moving every logit by ``shift`` (float64: exact at that magnitude)."""
    return torch.randn(L, S, dtype=torch.float64) + shift


def _large(d=24):
    q = torch.full((1, 1, 3, d), 10.0)
    return case(q=q, k=q.clone(), v=make(b=1, h=1, s=3)[2], n=1.0, scale=0.1)  # logits 240


ACCEPTED = {
    "plain": lambda: case(),
    "n-float": lambda: case(n=0.5),
    "n-int": lambda: case(n=2),
    "n-numpy-float32": lambda: case(n=np.float32(0.5)),
    "n-tiny": lambda: case(n=1e-30),
    "n-huge": lambda: case(n=1e30),
    "n-0dim-tensor": lambda: case(n=torch.tensor(1.5)),
    "n-single-1d": lambda: case(n=torch.tensor([1.5])),
    "n-single-2d": lambda: case(n=torch.ones(1, 1)),
    "n-per-head": lambda: case(n=torch.tensor([0.5, 3.0]).view(H, 1, 1)),
    "n-per-head-4d": lambda: case(n=torch.tensor([0.5, 3.0]).view(1, H, 1, 1)),
    "n-per-row": lambda: case(n=torch.rand(H, L, 1)),
    "n-full": lambda: case(n=torch.rand(B, H, L, 1)),
    "n-per-batch": lambda: case(n=torch.tensor([0.0, 2.0]).view(B, 1, 1, 1)),
    "n-int-tensor": lambda: case(n=torch.tensor([1, 2]).view(H, 1, 1)),
    "n-zero-tensor": lambda: case(n=torch.zeros(H, 1, 1)),
    "n-float64-tensor": lambda: case(n=torch.tensor(0.5, dtype=torch.float64)),
    "bool-mask-2d": lambda: mask_case(n=1.0, mask=_keep()),
    "bool-mask-4d": lambda: mask_case(n=1.0, mask=_keep().expand(B, 1, L, S)),
    "bool-mask-1d": lambda: mask_case(n=1.0, mask=_keep()[0]),
    "float32-mask": lambda: mask_case(n=1.0, mask=torch.randn(L, S)),
    "float-mask-minus-inf": lambda: mask_case(n=0.5, mask=_row_masked(torch.float32)),
    "float32-mask-bfloat16-query": lambda: mask_case(
        *make(dtype=torch.bfloat16), n=1.0, mask=torch.randn(L, S)
    ),
    "float16-mask-float16-query": lambda: mask_case(
        *make(dtype=torch.float16), n=1.0, mask=torch.randn(L, S).half()
    ),
    "fully-masked-row-n0": lambda: mask_case(mask=_row_masked()),
    "fully-masked-row-n1": lambda: mask_case(n=1.0, mask=_row_masked()),
    "fully-masked-float-row-n0": lambda: mask_case(mask=_row_masked(torch.float32)),
    "bias-float64": lambda: mask_case(n=1.0, bias=torch.randn(H, L, S, dtype=torch.float64)),
    "mask-bias-causal": lambda: mask_case(
        n=0.5, mask=_keep(), bias=torch.randn(H, L, S), causal=True
    ),
    "causal-L<S": lambda: case(n=1.0, causal=True),
    "causal-L==S": lambda: case(*make(s=L), n=1.0, causal=True),
    "causal-L>S-n0": lambda: case(*make(length=7, s=4), causal=True),  # 3 rows see no key
    "causal-L>S-n1": lambda: case(*make(length=7, s=4), n=1.0, causal=True),
    "empty-L": lambda: case(*make(length=0), n=1.0),
    "empty-L-causal-mask": lambda: mask_case(
        *make(length=0), mask=torch.ones(0, S, dtype=torch.bool), causal=True
    ),
    "empty-S-n0": lambda: case(*make(s=0)),
    "empty-S-n1": lambda: case(*make(s=0), n=1.0),
    "empty-S-causal": lambda: case(*make(s=0), causal=True),
    "empty-B": lambda: case(*make(b=0), n=1.0),
    "empty-H": lambda: case(*make(h=0), n=1.0),
    "head-dim-0": lambda: case(*make(d=0), n=1.0),
    "value-head-dim-0": lambda: case(*make(dv=0), n=1.0),
    "value-head-dim-differs": lambda: case(*make(dv=5), n=1.0),
    "value-head-dim-differs-gqa-causal": lambda: case(
        *make(h=4, hk=2, dv=12), n=torch.rand(4, 1, 1), causal=True
    ),
    "gqa": lambda: case(*make(h=4, hk=2), n=0.5),
    "shared-kv-3d": lambda: case(q0, k0[:, 0], v0[:, 0], n=0.5),
    "kv-head-stride-0": lambda: case(
        k=k0[:, :1].expand(B, H, S, D), v=v0[:, :1].expand(B, H, S, D)
    ),
    "transposed-query": lambda: case(q=q0.transpose(1, 2).contiguous().transpose(1, 2), n=1.0),
    "strided-key": lambda: case(k=_strided(k0), n=1.0),
    "sliced-value": lambda: case(v=make(d=2 * D)[2][..., ::2], n=1.0),
    "nan-in-query-row": lambda: case(q=_with(q0, (0, 1, 2, 0), float("nan")), n=1.0),
    "nan-in-key": lambda: case(k=_with(k0, (1, 0, 3, 0), float("nan")), n=1.0),
    "inf-in-value": lambda: case(v=_with(v0, (0, 0, 2, 1), float("inf")), n=1.0),
    "inf-in-query": lambda: case(q=_with(q0, (1, 1, 0, 3), float("inf")), n=1.0),
    "large-logits-240": _large,
    "very-negative-logits-n0": lambda: mask_case(*make(dtype=torch.float64), bias=_far(-1e4)),
    "very-negative-logits-n1": lambda: mask_case(
        *make(dtype=torch.float64), n=1.0, bias=_far(-1e4)
    ),
    "float64": lambda: case(*make(dtype=torch.float64), n=0.5),
    "float16": lambda: case(*make(dtype=torch.float16), n=0.5),
    "bfloat16": lambda: case(*make(dtype=torch.bfloat16), n=0.5, causal=True),
    "scale-given": lambda: case(n=1.0, scale=0.3),
    "scale-zero": lambda: case(n=1.0, scale=0.0),
    "scale-int": lambda: case(n=1.0, scale=1),
    "dropout-zero": lambda: mask_case(n=1.0, dropout_p=0.0),
}


def expected(c: Case) -> torch.Tensor:
    kw = c.kw
    return reference(
        c.q, c.k, c.v, n=kw.get("n", 0.0), mask=kw.get("mask"), bias=kw.get("bias"),
        scale=kw.get("scale"), causal=kw.get("causal", False),
    )  # fmt: skip


def check_accepted(fn_name, c: Case):
    out = run(fn_name, c)
    want = expected(c)
    assert out.dtype == c.q.dtype and out.shape == want.shape
    rtol, atol = TOL[c.q.dtype]
    torch.testing.assert_close(out.double(), want, rtol=rtol, atol=atol, equal_nan=True)


ACCEPTED_PARAMS = [
    pytest.param(name, fn, id=f"{name}-{fn}")
    for name, build in ACCEPTED.items()
    for fn in build().fns
    if fn != "triton"
]


@pytest.mark.parametrize(("name", "fn"), ACCEPTED_PARAMS)
def test_accepted_equals_float64_reference(name, fn):
    check_accepted(fn, ACCEPTED[name]())


TRITON_ACCEPTED = [
    name
    for name, build in ACCEPTED.items()
    if "triton" in build().fns and build().q.dtype != torch.float64
]


@pytest.mark.interpret
@pytest.mark.parametrize("name", TRITON_ACCEPTED)
def test_accepted_equals_float64_reference_triton(name):
    c = ACCEPTED[name]()
    if c.q.dtype == torch.bfloat16:  # the interpreter has no bfloat16: the reference runs
        with pytest.warns(UserWarning, match="bfloat16"):
            check_accepted("triton", c)
    else:
        check_accepted("triton", c)


@pytest.mark.parametrize("fn", ["flash", "slow", "triton"])
def test_meta_tensors_give_the_output_shape(fn):
    q, k, v = (t.to("meta") for t in make(dv=6))
    n = torch.ones(H, 1, 1, device="meta")
    out = FNS[fn](q, k, v, softmax_n_param=n, is_causal=True)
    assert out.device.type == "meta" and out.shape == (B, H, L, 6) and out.dtype == q.dtype


CUDA_CASES = [
    "plain", "n-per-head", "n-zero-tensor", "n-tiny", "causal-L==S", "causal-L>S-n0",
    "empty-L", "empty-S-n0", "empty-S-n1", "empty-B", "empty-H", "head-dim-0", "value-head-dim-0",
    "value-head-dim-differs", "value-head-dim-differs-gqa-causal", "gqa", "shared-kv-3d",
    "kv-head-stride-0", "transposed-query", "nan-in-query-row", "nan-in-key", "large-logits-240",
    "fully-masked-row-n0", "float32-mask-bfloat16-query",
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fn", ["flash", "triton"])
@pytest.mark.parametrize("name", CUDA_CASES)
def test_accepted_on_cuda(name, fn, dtype):
    """The edge cases on CUDA, in each dtype: PyTorch's fused kernels (fp16/bf16 with head dims
    that are multiples of 8) and the Triton kernels."""
    c = ACCEPTED[name]()
    if fn not in c.fns:
        pytest.skip("takes no mask")
    move = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t
    c = Case(*(t.to("cuda", dtype) for t in (c.q, c.k, c.v)), {k: move(x) for k, x in c.kw.items()})
    check_accepted(fn, c)
