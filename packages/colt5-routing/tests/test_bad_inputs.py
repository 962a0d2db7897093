"""Bad and unusual inputs: each case either raises a clear error (``TypeError``/``ValueError``)
before any compute kernel runs, or gives the result of a float64 reference.

A case builds its module and inputs for a dtype and returns a thunk. Error cases run the thunk
under a dispatch mode that records every ATen op: none may run before the error, except the few
that read a tensor ``k`` back to check its values. Accepted cases run in float32 and in float64
(the same parameters and inputs) and must agree; meta-device cases must give the shape, dtype and
device that the float64 reference on CPU would.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from colt5_routing import (
    ConditionalRoutedAttention,
    ConditionalRoutedAutoregressiveAttention,
    ConditionalRoutedCrossAttention,
    ConditionalRoutedFeedForward,
    ConditionalRoutedImageAttention,
    ConditionalRoutedTransformerBlock,
    ConditionalRoutedViT,
    CoordinateDescentRouter,
    coor_descent,
    local_attention,
    topk,
    triton_coor_descent,
)
from torch.utils._python_dispatch import TorchDispatchMode

D = 8
RK = dict(router_kwargs=dict(n_iters=4))  # short coordinate descent: these cases test plumbing
SMALL = dict(light_dim_head=4, light_heads=2, heavy_dim_head=4, heavy_heads=2, **RK)
CD = dict(n_iters=8, eps=0.2, eps_init=2.0, eps_decay=0.8)
# ops that read a tensor k back to validate its values
K_CHECK_OPS = {
    "aten._to_copy", "aten.expand", "aten.view", "aten.detach", "aten.alias", "aten.gt",
    "aten.isfinite", "aten.abs", "aten.eq", "aten.ne", "aten.mul", "aten.bitwise_and",
    "aten.logical_and", "aten.all", "aten.any",
    "aten._local_scalar_dense", "aten.is_nonzero", "aten.reshape", "aten.lift_fresh",
}  # fmt: skip


class RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _scores(dtype, shape=(3, 10)):
    return _randn(*shape, dtype=dtype) * 2


def _mask(b=2, n=12):
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[-1, n // 2 :] = False
    return mask


# ---- the modules ------------------------------------------------------------------------------


def _ff(**kw):
    return ConditionalRoutedFeedForward(D, num_heavy_tokens=4, **RK, **kw)


def _attn(**kw):
    return ConditionalRoutedAttention(
        D, num_heavy_tokens_q=4, num_heavy_tokens_kv=5, light_window_size=4, **SMALL, **kw
    )


def _cross(**kw):
    return ConditionalRoutedCrossAttention(
        D, num_tokens_q=4, num_tokens_kv=5, dim_head=4, heads=2, **RK, **kw
    )


def _ar(**kw):
    return ConditionalRoutedAutoregressiveAttention(
        D, num_heavy_tokens_q=2, num_heavy_tokens_kv=3, light_window_size=4, heavy_window_size=4,
        **SMALL, **kw,
    )  # fmt: skip


def _image(**kw):
    return ConditionalRoutedImageAttention(
        D, num_heavy_tokens_q=4, num_heavy_tokens_kv=4, light_window_size=2, **SMALL, **kw
    )


def _blk(**kw):
    return ConditionalRoutedTransformerBlock(
        D, num_heavy_attn_tokens_q=4, num_heavy_attn_tokens_kv=4, num_heavy_ff_tokens=4,
        light_window_size=4, **SMALL, **kw,
    )  # fmt: skip


SEQ_BLOCKS = {"ff": _ff, "attn": _attn, "causal": lambda: _attn(causal=True), "ar": _ar,
              "blk": _blk}  # fmt: skip


def _module(make, dtype, device="cpu"):
    torch.manual_seed(0)
    with torch.device(device):
        return make().to(dtype)


# ---- cases ------------------------------------------------------------------------------------
# each: (id, build(dtype) -> thunk, expected exception type, or "ok" / "meta")

Case = tuple[str, Callable, object]
CASES: list[Case] = []


def case(name: str, expect: object, *, k_check: bool = False):
    def register(build):
        CASES.append(pytest.param(build, expect, k_check, id=name))
        return build

    return register


def _thunk(fn, *args, **kwargs):
    """``fn`` bound to arguments built now (outside the recorded region)."""
    return lambda: fn(*args, **kwargs)


def _cd(dtype, shape=(3, 10), **kw):
    return _thunk(coor_descent, _scores(dtype, shape), **{"k": 2.0, **CD, **kw})


# coor_descent: masks (accepted and refused kinds)
_MASK = torch.rand(3, 10, generator=torch.Generator().manual_seed(3)) > 0.3
for _name, _mask_fn in {
    "float": lambda: torch.ones(3, 10),
    "int64": lambda: torch.ones(3, 10, dtype=torch.long),
    "uint8": lambda: torch.ones(3, 10, dtype=torch.uint8),
    "list": lambda: [[True] * 10] * 3,
}.items():
    case(f"cd-mask-{_name}", TypeError)(lambda dtype, f=_mask_fn: _cd(dtype, mask=f()))
for _name, _shape in {"short": (3, 9), "extra-dim": (3, 10, 1), "rows": (2, 10)}.items():
    case(f"cd-mask-shape-{_name}", ValueError)(
        lambda dtype, sh=_shape: _cd(dtype, mask=torch.ones(sh, dtype=torch.bool))
    )
case("cd-mask-other-device", ValueError)(
    lambda dtype: _cd(dtype, mask=torch.ones(3, 10, dtype=torch.bool, device="meta"))
)
for _name, _mask_fn in {
    "bool": lambda: _MASK,
    "broadcast-row": lambda: _MASK[0],
    "broadcast-1xn": lambda: _MASK[:1],
    "transposed": lambda: _MASK.T.contiguous().T,
    "expanded": lambda: _MASK[:1].expand(3, 10),
    "all-false-row": lambda: torch.cat([_MASK[:2], torch.zeros(1, 10, dtype=torch.bool)]),
    "all-false": lambda: torch.zeros(3, 10, dtype=torch.bool),
}.items():
    case(f"cd-mask-ok-{_name}", "ok")(lambda dtype, f=_mask_fn: _cd(dtype, k=3.0, mask=f()))

# coor_descent: scores
for _name, _dtype in {"int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
                      "int64": torch.int64, "complex": torch.complex64}.items():  # fmt: skip
    case(f"cd-s-{_name}", TypeError)(
        lambda dtype, dt=_dtype: _thunk(coor_descent, torch.zeros(3, 10, dtype=dt), k=2.0, **CD)
    )
case("cd-s-scalar", ValueError)(
    lambda dtype: _thunk(coor_descent, torch.tensor(1.0, dtype=dtype), k=1.0, **CD)
)
case("cd-s-not-a-tensor", TypeError)(lambda dtype: _thunk(coor_descent, [1.0, 2.0], k=1.0, **CD))
case("cd-empty-rows", "ok")(lambda dtype: _cd(dtype, (0, 10)))
case("cd-empty-last-dim", "ok")(lambda dtype: _cd(dtype, (3, 0)))


def _nonfinite(dtype):
    s = _scores(dtype)
    s[0, 1], s[1, 2], s[2, 3], s[2, 4] = float("nan"), float("inf"), float("-inf"), float("inf")
    return s


case("cd-nan-inf", "ok")(lambda dtype: _thunk(coor_descent, _nonfinite(dtype), k=3.0, **CD))
case("cd-transposed", "ok")(
    lambda dtype: _thunk(coor_descent, _scores(dtype, (10, 3)).T, k=3.0, **CD)
)
case("cd-strided", "ok")(
    lambda dtype: _thunk(coor_descent, _scores(dtype, (3, 20))[:, ::2], k=2.0, **CD)
)
case("cd-batched-3d", "ok")(
    lambda dtype: (lambda s: _thunk(coor_descent, s, k=2.0, mask=s > -1, **CD))(
        _scores(dtype, (2, 3, 10))
    )
)
case("cd-meta", "meta")(
    lambda dtype, device="cpu": _thunk(
        coor_descent, _scores(dtype).to(device), k=torch.tensor(2.0, device=device), **CD
    )
)

# coor_descent: k and hyper-parameters
for _name, _k, _err in [
    ("zero", 0, ValueError), ("negative", -1.0, ValueError), ("nan", float("nan"), ValueError),
    ("inf", float("inf"), ValueError), ("str", "2", TypeError), ("bool", True, TypeError),
    ("wrong-shape", torch.ones(4), ValueError),
]:  # fmt: skip
    case(f"cd-k-{_name}", _err)(lambda dtype, k=_k: _cd(dtype, k=k))
for _name, _k in [("tensor-negative", torch.tensor([1.0, -1.0, 2.0])),
                  ("tensor-nan", torch.tensor([1.0, float("nan"), 2.0]))]:  # fmt: skip
    case(f"cd-k-{_name}", ValueError, k_check=True)(lambda dtype, k=_k: _cd(dtype, k=k))
for _name, _k in [("above-n", 25.0), ("per-row", torch.tensor([1.0, 4.0, 12.0])),
                  ("one-element", torch.tensor([[3.0]])), ("int", 3)]:  # fmt: skip
    case(f"cd-k-ok-{_name}", "ok")(lambda dtype, k=_k: _cd(dtype, k=k))
for _name, _kw, _err in [
    ("n-iters-zero", dict(n_iters=0), ValueError), ("n-iters-float", dict(n_iters=2.5), TypeError),
    ("eps-zero", dict(eps=0.0), ValueError), ("eps-nan", dict(eps=float("nan")), ValueError),
    ("eps-decay", dict(eps_decay=1.5), ValueError), ("backend", dict(backend="cuda"), ValueError),
]:  # fmt: skip
    case(f"cd-{_name}", _err)(lambda dtype, kw=_kw: _cd(dtype, **kw))
case("triton-float64", TypeError)(
    lambda dtype: _thunk(triton_coor_descent, _scores(torch.float64), k=2.0, **CD)
)
case("triton-int8", TypeError)(
    lambda dtype: _thunk(triton_coor_descent, torch.zeros(3, 10, dtype=torch.int8), k=2.0, **CD)
)
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    case("triton-cpu-without-interpreter", ValueError)(
        lambda dtype: _thunk(triton_coor_descent, _scores(dtype), k=2.0, **CD)
    )

# topk
for _name, _k, _err in [("zero", 0, ValueError), ("above-n", 11, ValueError),
                        ("float", 2.0, TypeError)]:  # fmt: skip
    case(f"topk-k-{_name}", _err)(lambda dtype, k=_k: _thunk(topk, _scores(dtype), k))
case("topk-int-input", TypeError)(lambda dtype: _thunk(topk, torch.arange(10), 2))
case("topk-mask-float", TypeError)(
    lambda dtype: _thunk(topk, _scores(dtype), 2, mask=torch.ones(3, 10))
)
case("topk-hard-masked", "ok")(
    lambda dtype: _thunk(
        lambda s: topk(s, 4, mask=_MASK, non_differentiable=True).values, _scores(dtype)
    )
)
case("topk-soft-masked", "ok")(
    lambda dtype: _thunk(lambda s: topk(s, 4, mask=_MASK, n_iters=8).values, _scores(dtype))
)


# router
def _router(dtype, shape=(2, 12, D), **kw):
    return _thunk(
        _module(lambda: CoordinateDescentRouter(D), dtype), _randn(*shape, dtype=dtype), **kw
    )


for _name, _shape in {"2d": (12, D), "wrong-dim": (2, 12, D + 1)}.items():
    case(f"router-x-{_name}", ValueError)(lambda dtype, sh=_shape: _router(dtype, sh, num_tokens=2))
for _name, _nt, _err in [("zero", 0, ValueError), ("above-n", 13, ValueError),
                         ("float", 2.0, TypeError)]:  # fmt: skip
    case(f"router-num-tokens-{_name}", _err)(lambda dtype, nt=_nt: _router(dtype, num_tokens=nt))
case("router-mask-int", TypeError)(
    lambda dtype: _router(dtype, num_tokens=2, mask=torch.ones(2, 12, dtype=torch.int))
)
case("router-unexpected-routing-tokens", ValueError)(
    lambda dtype: _router(dtype, num_tokens=2, routing_tokens=_randn(2, 1, D))
)
case("local-attention-window-zero", ValueError)(
    lambda dtype: (lambda q: _thunk(local_attention, q, q, q, 0))(_randn(1, 2, 6, 4, dtype=dtype))
)


# the routed blocks
def _blk_call(name, make, dtype, x, device="cpu", **kw):
    m = _module(make, dtype, device)
    if name == "cross":
        return _thunk(m, x, x.flip(1), **kw)
    return _thunk(m, x, **kw)


def _tokens(dtype, shape=(2, 12, D)):
    return _randn(*shape, dtype=dtype)


_BAD_X = {
    "2d": (lambda dtype: _tokens(dtype, (12, D)), ValueError),
    "wrong-dim": (lambda dtype: _tokens(dtype, (2, 12, D + 2)), ValueError),
    "int": (lambda dtype: torch.zeros(2, 12, D, dtype=torch.long), TypeError),
}
_BAD_MASK = {
    "float": (lambda: torch.ones(2, 12), TypeError),
    "uint8": (lambda: torch.ones(2, 12, dtype=torch.uint8), TypeError),
    "shape": (lambda: torch.ones(2, 11, dtype=torch.bool), ValueError),
    "3d": (lambda: torch.ones(2, 12, 1, dtype=torch.bool), ValueError),
    "meta": (lambda: torch.ones(2, 12, dtype=torch.bool, device="meta"), ValueError),
}
_OK_MASK = {
    "padding": _mask,
    "transposed": lambda: _mask().T.contiguous().T,
    "all-false-row": lambda: _mask() & torch.tensor([[True], [False]]),
    "all-true": lambda: torch.ones(2, 12, dtype=torch.bool),
}
for _blk_name, _make in SEQ_BLOCKS.items():
    for _name, (_x_fn, _err) in _BAD_X.items():
        case(f"{_blk_name}-x-{_name}", _err)(
            lambda dtype, mk=_make, xf=_x_fn: _thunk(_module(mk, dtype), xf(dtype))
        )
    for _name, (_m_fn, _err) in _BAD_MASK.items():
        case(f"{_blk_name}-mask-{_name}", _err)(
            lambda dtype, mk=_make, mf=_m_fn: _thunk(_module(mk, dtype), _tokens(dtype), mask=mf())
        )
    for _name, _m_fn in _OK_MASK.items() if _blk_name in ("ff", "attn", "ar") else ():
        case(f"{_blk_name}-mask-ok-{_name}", "ok")(
            lambda dtype, mk=_make, mf=_m_fn: _thunk(_module(mk, dtype), _tokens(dtype), mask=mf())
        )

_TOKENS_KW = {"ff": "num_heavy_tokens", "attn": "num_heavy_tokens_q",
              "causal": "num_heavy_tokens_kv", "ar": "num_heavy_tokens_q",
              "blk": "num_heavy_ff_tokens", "cross": "num_tokens_q"}  # fmt: skip
for _blk_name, _make in {**SEQ_BLOCKS, "cross": _cross}.items():
    _kw = _TOKENS_KW[_blk_name]
    for _name, _value, _err in [("negative", -1, ValueError), ("float", 2.5, TypeError)]:
        case(f"{_blk_name}-tokens-{_name}", _err)(
            lambda dtype, b=_blk_name, mk=_make, kw=_kw, v=_value: _blk_call(
                b, mk, dtype, _tokens(dtype), **{kw: v}
            )
        )
    for _name, _value in [("zero", 0), ("above-n", 50)]:
        case(f"{_blk_name}-tokens-{_name}", "ok")(
            lambda dtype, b=_blk_name, mk=_make, kw=_kw, v=_value: _blk_call(
                b, mk, dtype, _tokens(dtype), **{kw: v}
            )
        )
    for _name, _shape in [("empty-seq", (2, 0, D)), ("empty-batch", (0, 12, D)),
                          ("one-token", (2, 1, D))]:  # fmt: skip
        case(f"{_blk_name}-{_name}", "ok")(
            lambda dtype, b=_blk_name, mk=_make, sh=_shape: _blk_call(
                b, mk, dtype, _tokens(dtype, sh)
            )
        )
    case(f"{_blk_name}-transposed-x", "ok")(
        lambda dtype, b=_blk_name, mk=_make: _blk_call(
            b, mk, dtype, _tokens(dtype, (12, 2, D)).transpose(0, 1)
        )
    )
    case(f"{_blk_name}-nan-token", "ok")(
        lambda dtype, b=_blk_name, mk=_make: _blk_call(
            b, mk, dtype, _tokens(dtype).index_fill_(1, torch.tensor([3]), float("nan"))
        )
    )
    case(f"{_blk_name}-meta", "meta")(
        lambda dtype, device="cpu", b=_blk_name, mk=_make: _blk_call(
            b, mk, dtype, _tokens(dtype).to(device), device=device
        )
    )

case("cross-context-batch", ValueError)(
    lambda dtype: (lambda x: _thunk(_module(_cross, dtype), x, x[:1]))(_tokens(dtype))
)
case("cross-context-mask-shape", ValueError)(
    lambda dtype: (lambda x: _thunk(_module(_cross, dtype), x, x, context_mask=_mask(2, 5)))(
        _tokens(dtype)
    )
)
case("cross-empty-context", "ok")(
    lambda dtype: (lambda x: _thunk(_module(_cross, dtype), x, x[:, :0]))(_tokens(dtype))
)
for _name, _shape, _expect in [
    ("3d", (2, 12, D), ValueError), ("channels", (2, 3, 4, D + 1), ValueError),
    ("ok-odd-size", (2, 3, 5, D), "ok"), ("empty", (2, 0, 4, D), "ok"),
]:  # fmt: skip
    case(f"image-{_name}", _expect)(
        lambda dtype, sh=_shape: _thunk(_module(_image, dtype), _tokens(dtype, sh))
    )
case("image-ok-permuted", "ok")(
    lambda dtype: _thunk(_module(_image, dtype), _tokens(dtype, (2, D, 4, 4)).permute(0, 2, 3, 1))
)
case("image-int", TypeError)(
    lambda dtype: _thunk(_module(_image, dtype), torch.zeros(2, 4, 4, D, dtype=torch.long))
)


def _vit(**kw):
    return ConditionalRoutedViT(
        image_size=8, patch_size=4, num_classes=3, dim=D, depth=1, attn_num_heavy_tokens_q=2,
        attn_num_heavy_tokens_kv=2, attn_light_window_size=2, attn_light_dim_head=4,
        attn_light_heads=2, attn_heavy_dim_head=4, attn_heavy_heads=2, ff_num_heavy_tokens=2, **RK,
        **kw,
    )  # fmt: skip


for _name, _images, _err in [
    ("size", lambda: torch.randn(2, 3, 12, 12), ValueError),
    ("channels", lambda: torch.randn(2, 1, 8, 8), ValueError),
    ("uint8", lambda: torch.zeros(2, 3, 8, 8, dtype=torch.uint8), TypeError),
]:  # fmt: skip
    case(f"vit-{_name}", _err)(lambda dtype, im=_images: _thunk(_module(_vit, dtype), im()))
case("vit-ok-channels-last-memory", "ok")(
    lambda dtype: _thunk(
        _module(_vit, dtype),
        _randn(2, 3, 8, 8, dtype=dtype).contiguous(memory_format=torch.channels_last),
    )
)
case("heads-not-divisible", ValueError)(
    lambda dtype: _thunk(
        ConditionalRoutedAttention,
        D,
        num_heavy_tokens_q=2,
        num_heavy_tokens_kv=2,
        num_routed_kv=3,
        heavy_heads=2,
    )
)

# backend="triton" where Triton cannot run: float64 anywhere, CPU tensors without the
# interpreter; raised before anything runs (the blocks check their routers first)
_TRITON = dict(backend="triton")
_TRITON_CASES = {
    "cd": lambda dtype: _cd(dtype, **_TRITON),
    "topk": lambda dtype: _thunk(topk, _scores(dtype), 2, n_iters=4, **_TRITON),
    "router": lambda dtype: _thunk(
        _module(lambda: CoordinateDescentRouter(D, **_TRITON), dtype), _tokens(dtype), num_tokens=2
    ),
    "image": lambda dtype: _thunk(
        _module(lambda: _image(**_TRITON), dtype), _tokens(dtype, (2, 4, 4, D))
    ),
    "vit": lambda dtype: _thunk(
        _module(lambda: _vit(**_TRITON), dtype), _randn(2, 3, 8, 8, dtype=dtype)
    ),
}
for _blk_name, _make in {"ff": _ff, "attn": _attn, "ar": _ar, "blk": _blk, "cross": _cross}.items():
    _TRITON_CASES[_blk_name] = lambda dtype, b=_blk_name, mk=_make: _blk_call(
        b, lambda: mk(**_TRITON), dtype, _tokens(dtype)
    )
for _name, _build in _TRITON_CASES.items():
    case(f"{_name}-backend-triton-float64", TypeError)(lambda dtype, b=_build: b(torch.float64))
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        case(f"{_name}-backend-triton-cpu-without-interpreter", ValueError)(_build)


@pytest.mark.parametrize(("build", "expect", "k_check"), CASES)
def test_bad_input(build, expect, k_check):
    if expect == "ok":
        out32 = build(torch.float32)()
        out64 = build(torch.float64)()
        assert out32.dtype == torch.float32 and out64.dtype == torch.float64
        assert out32.shape == out64.shape
        torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-5, equal_nan=True)
    elif expect == "meta":
        out = build(torch.float32, device="meta")()
        ref = build(torch.float64)()
        assert out.device.type == "meta" and out.shape == ref.shape and out.dtype == torch.float32
    else:
        thunk = build(torch.float32)
        rec = RecordOps()
        with pytest.raises(expect), rec:
            thunk()
        allowed = K_CHECK_OPS if k_check else set()
        assert set(rec.ops) <= allowed, f"ran {rec.ops} before raising"


def test_enough_cases():
    assert len(CASES) >= 40
