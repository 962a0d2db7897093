"""``backend=`` across the public API, and its deprecated spellings.

``coor_descent(backend="auto-triton")``, ``topk(fused=)`` and ``use_triton=`` (router and blocks)
warn once (``FutureWarning``) and take the path their replacement takes; an alias and a
``backend`` that disagree raise; bad names raise. Which path runs is recorded with the Triton
kernels faked (``paths``), so the CPU tests see the dispatch that CUDA or the interpreter would
get without running a kernel; the ``interpret`` and ``gpu`` tests run the kernels.
"""

from __future__ import annotations

import importlib
import warnings

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
    topk,
)

cdm = importlib.import_module("colt5_routing.coor_descent")
tcd = importlib.import_module("colt5_routing.coor_descent_triton")

D = 8
CD = dict(k=3.0, n_iters=4, eps=0.2, eps_init=1.0, eps_decay=0.8)
RK = dict(router_kwargs=dict(n_iters=3))
SMALL = dict(light_dim_head=4, light_heads=2, heavy_dim_head=4, heavy_heads=2, **RK)


def _scores():
    return torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(1))


def _make_tokens(shape=(2, 12, D)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(2))


_tokens = _make_tokens  # the gpu test moves them to CUDA


def _module(make, *args, **kwargs):
    """A call of a module built by ``make`` (under a fixed seed, on the device of the first
    argument) on ``args``."""
    torch.manual_seed(0)
    module = make().to(args[0].device)
    return module(*args, **kwargs)


# each: the output of one public entry point for backend keywords ``kw``
CALLS = {
    "coor_descent": lambda **kw: coor_descent(_scores(), **CD, **kw),
    "topk": lambda **kw: topk(_scores(), 3, n_iters=4, **kw).values,
    "router": lambda **kw: (
        _module(lambda: CoordinateDescentRouter(D, n_iters=3, **kw), _tokens(), num_tokens=3).scores
    ),
    "ff": lambda **kw: _module(
        lambda: ConditionalRoutedFeedForward(D, num_heavy_tokens=3, **RK, **kw), _tokens()
    ),
    "attn": lambda **kw: _module(
        lambda: ConditionalRoutedAttention(
            D, num_heavy_tokens_q=3, num_heavy_tokens_kv=3, light_window_size=4, **SMALL, **kw
        ),
        _tokens(),
    ),
    "cross": lambda **kw: _module(
        lambda: ConditionalRoutedCrossAttention(
            D, num_tokens_q=3, num_tokens_kv=3, dim_head=4, heads=2, **RK, **kw
        ),
        _tokens(),
        _tokens((2, 10, D)),
    ),
    "ar": lambda **kw: _module(
        lambda: ConditionalRoutedAutoregressiveAttention(
            D, num_heavy_tokens_q=2, num_heavy_tokens_kv=3, light_window_size=4, **SMALL, **kw
        ),
        _tokens(),
    ),
    "image": lambda **kw: _module(
        lambda: ConditionalRoutedImageAttention(
            D, num_heavy_tokens_q=3, num_heavy_tokens_kv=3, light_window_size=2, **SMALL, **kw
        ),
        _tokens((2, 4, 4, D)),
    ),
    "block": lambda **kw: _module(
        lambda: ConditionalRoutedTransformerBlock(
            D,
            num_heavy_attn_tokens_q=3,
            num_heavy_attn_tokens_kv=3,
            num_heavy_ff_tokens=3,
            light_window_size=4,
            **SMALL,
            **kw,
        ),
        _tokens(),
    ),
    "vit": lambda **kw: _module(
        lambda: ConditionalRoutedViT(
            image_size=8,
            patch_size=4,
            num_classes=3,
            dim=D,
            depth=1,
            attn_num_heavy_tokens_q=2,
            attn_num_heavy_tokens_kv=2,
            attn_light_window_size=2,
            attn_light_dim_head=4,
            attn_light_heads=2,
            attn_heavy_dim_head=4,
            attn_heavy_heads=2,
            ff_num_heavy_tokens=2,
            **RK,
            **kw,
        ),
        torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)),
    ),
}
BLOCKS = [name for name in CALLS if name not in ("coor_descent", "topk", "router")]

# (entry point, deprecated spelling, what it means: "auto" = Triton where it can run, the CPU
# interpreter included, else the reference; "reference")
ALIASES = [
    ("coor_descent", dict(backend="auto-triton"), "auto"),
    ("topk", dict(fused=True), "auto"),
    ("topk", dict(fused=False), "reference"),
    ("router", dict(use_triton=True), "auto"),
    ("router", dict(use_triton=False), "reference"),
    *[(name, dict(use_triton=True), "auto") for name in BLOCKS],
    ("ff", dict(use_triton=False), "reference"),
    ("block", dict(use_triton=False), "reference"),
]


@pytest.fixture
def paths(monkeypatch):
    """The paths the coordinate descents take, in order (``"reference"`` / ``"triton"``), with
    Triton faked as installed and its kernels replaced by the reference (the same numbers)."""
    taken: list[str] = []
    reference = cdm.coor_descent_reference

    def fake_reference(*args, **kwargs):
        taken.append("reference")
        return reference(*args, **kwargs)

    def fake_triton(s, *, checkpoint_segments=1, **kwargs):
        taken.append("triton")
        return reference(s, **kwargs)

    monkeypatch.setattr(cdm, "coor_descent_reference", fake_reference)
    monkeypatch.setattr(tcd, "triton_coor_descent", fake_triton)
    monkeypatch.setattr(tcd, "HAS_TRITON", True)
    return taken


def _interpreting(monkeypatch, on: bool) -> None:
    monkeypatch.setattr(tcd, "_interpreting", lambda: on)


def _id(name: str, kw: dict) -> str:
    return "-".join([name, *(f"{k}={v}" for k, v in kw.items())])


@pytest.mark.parametrize("interpret", [False, True], ids=["cpu", "cpu-interpreter"])
@pytest.mark.parametrize(
    ("name", "alias", "meaning"), [pytest.param(*case, id=_id(*case[:2])) for case in ALIASES]
)
def test_alias_warns_once_and_runs_like_its_replacement(
    name, alias, meaning, interpret, paths, monkeypatch
):
    _interpreting(monkeypatch, interpret)
    with pytest.warns(FutureWarning) as record:
        old = CALLS[name](**alias)
    future = [w for w in record if issubclass(w.category, FutureWarning)]
    assert len(future) == 1, [str(w.message) for w in future]
    message = str(future[0].message)
    assert "deprecated" in message and "0.3" in message and "backend=" in message
    assert future[0].filename == __file__  # points at the caller's line
    old_paths = list(paths)
    paths.clear()
    # on CPU the replacement of the automatic aliases is None without the interpreter and
    # "triton" with it (for CUDA tensors it is None, see the gpu test)
    backend = {"auto": "triton" if interpret else None, "reference": "reference"}[meaning]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        new = CALLS[name](backend=backend)
    expected = "triton" if meaning == "auto" and interpret else "reference"
    assert old_paths and set(old_paths) == {expected}
    assert paths == old_paths
    assert torch.equal(old, new)


@pytest.mark.parametrize("interpret", [False, True], ids=["cpu", "cpu-interpreter"])
@pytest.mark.parametrize(("name", "alias"), [("router", "use_triton"), ("topk", "fused")])
def test_alias_agreeing_with_backend_warns_and_runs(name, alias, interpret, paths, monkeypatch):
    _interpreting(monkeypatch, interpret)
    with pytest.warns(FutureWarning, match=f"{alias}=False"):
        old = CALLS[name](**{alias: False}, backend="reference")
    assert paths and set(paths) == {"reference"}
    assert torch.equal(old, CALLS[name](backend="reference"))


def test_backend_none_does_not_run_the_interpreter(paths, monkeypatch):
    # None: Triton for CUDA tensors only; the deprecated automatic spellings also ran the CPU
    # interpreter, which is why they map to "triton" there
    _interpreting(monkeypatch, True)
    CALLS["coor_descent"]()
    CALLS["router"](backend=None)
    assert paths == ["reference", "reference"]
    CALLS["coor_descent"](backend="triton")
    assert paths[-1] == "triton"


CONFLICTS = [
    ("topk", dict(fused=True, backend="reference")),
    ("topk", dict(fused=True, backend="triton")),  # "triton" raises where fused fell back
    ("topk", dict(fused=False, backend="triton")),
    ("router", dict(use_triton=True, backend="reference")),
    ("router", dict(use_triton=False, backend="triton")),
    *[(name, dict(use_triton=True, backend="triton")) for name in BLOCKS],
    ("ff", dict(use_triton=False, backend="triton")),
]


@pytest.mark.parametrize(("name", "kw"), [pytest.param(*case, id=_id(*case)) for case in CONFLICTS])
def test_alias_and_backend_that_disagree_raise(name, kw, paths):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # raises before warning
        with pytest.raises(ValueError, match="disagree"):
            CALLS[name](**kw)
    assert paths == []


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("backend", ["cuda", "Triton"])
def test_invalid_backend_raises(name, backend, paths):
    with pytest.raises(ValueError, match="backend must be None, 'reference' or 'triton'"):
        CALLS[name](backend=backend)
    assert paths == []


@pytest.mark.parametrize("name", [name for name in CALLS if name != "coor_descent"])
def test_auto_triton_is_only_a_coor_descent_alias(name):
    with pytest.raises(ValueError, match="backend must be"):
        CALLS[name](backend="auto-triton")


def test_topk_checks_the_backend_name_without_coordinate_descent():
    with pytest.raises(ValueError, match="backend must be"):
        topk(_scores(), 2, non_differentiable=True, backend="fused")


@pytest.mark.parametrize("name", list(CALLS))
def test_triton_on_cpu_without_interpreter_raises_before_any_kernel(name, paths, monkeypatch):
    _interpreting(monkeypatch, False)
    with pytest.raises(ValueError, match=r"backend=.triton. needs CUDA tensors .*TRITON_INTERPRET"):
        CALLS[name](backend="triton")
    assert paths == []  # neither the kernels nor the reference ran


def test_triton_not_installed_raises(paths, monkeypatch):
    monkeypatch.setattr(tcd, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="triton package"):
        CALLS["router"](backend="triton")
    assert CALLS["router"](backend=None).shape == (2, 3)  # None falls back to the reference
    assert paths == ["reference"]


def test_router_use_triton_attribute_is_deprecated_and_state_dict_unchanged():
    torch.manual_seed(0)
    new = CoordinateDescentRouter(D, backend="reference")
    with pytest.warns(FutureWarning):
        old = CoordinateDescentRouter(D, use_triton=True)
    assert old.state_dict().keys() == new.state_dict().keys() == {"routing_token"}
    for router, value in [(CoordinateDescentRouter(D), None), (new, False), (old, True)]:
        with pytest.warns(FutureWarning, match=r"use_triton is deprecated.*\.backend"):
            assert router.use_triton is value
    with pytest.warns(FutureWarning):
        new.use_triton = None
    assert new.backend is None
    with pytest.warns(FutureWarning):
        new.use_triton = False
    assert new.backend == "reference"
    with pytest.warns(FutureWarning):
        new.use_triton = True
    assert new.backend == old.backend == "auto-triton"


def test_router_kwargs_name_the_backend_of_a_block():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        block = ConditionalRoutedFeedForward(
            D, num_heavy_tokens=2, backend="triton", router_kwargs=dict(backend="reference")
        )
    assert block.router.backend == "reference"  # router_kwargs win, as they did for use_triton


@pytest.mark.interpret
def test_aliases_run_the_kernels_interpret():
    s = _scores()
    with pytest.warns(FutureWarning):
        old = coor_descent(s, backend="auto-triton", **CD)
    torch.testing.assert_close(old, coor_descent(s, backend="triton", **CD), rtol=0, atol=0)
    with pytest.warns(FutureWarning):
        old = CALLS["router"](use_triton=True)
    torch.testing.assert_close(old, CALLS["router"](backend="triton"), rtol=0, atol=0)
    # float64: the alias falls back to the reference, "triton" raises
    s64 = s.double()
    with pytest.warns(FutureWarning):
        torch.testing.assert_close(
            coor_descent(s64, backend="auto-triton", **CD),
            coor_descent(s64, backend="reference", **CD),
        )
    with pytest.raises(TypeError, match="float64"):
        coor_descent(s64, backend="triton", **CD)


@pytest.mark.gpu
def test_aliases_match_none_on_cuda_gpu(monkeypatch):
    # for CUDA tensors the automatic aliases are backend=None: Triton for fp32, the reference
    # for float64
    for dtype in (torch.float32, torch.float64):
        s = _scores().to("cuda", dtype)
        with pytest.warns(FutureWarning):
            old = coor_descent(s, backend="auto-triton", **CD)
        torch.testing.assert_close(old, coor_descent(s, **CD), rtol=0, atol=0)
    monkeypatch.setitem(globals(), "_tokens", lambda shape=(2, 12, D): _make_tokens(shape).cuda())
    for name, alias, new in [("block", True, None), ("router", False, "reference")]:
        with pytest.warns(FutureWarning):
            old = CALLS[name](use_triton=alias)
        assert old.is_cuda
        torch.testing.assert_close(old, CALLS[name](backend=new), rtol=0, atol=0)
