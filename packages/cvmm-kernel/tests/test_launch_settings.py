"""Launch settings passed per call: ``cvmm(..., config=)``, ``moe_mlp`` / ``moe_linear(...,
block_m=, gemm_configs=)`` and ``moe_mlp``'s private ``_backward_overlap=``.

Other settings than the shipped ones give the default result (the reference ignores them; the
interpreter runs the kernels with them, which the tests check at the launches), under
``torch.compile`` too, and bad ones raise before anything runs.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from cvmm_kernel import cvmm, cvmm_prepare_sel2, moe_linear, moe_mlp
from cvmm_kernel.moe_ops import (
    GEMM_CONFIGS,
    check_gemm_configs,
    decode_gemm_configs,
    encode_gemm_configs,
)

from testing_support import BACKENDS, DEVICES, assert_compiled_matches_eager

moe_ops = importlib.import_module("cvmm_kernel.moe_ops")


def _run(fn, leaves):
    """``fn(*leaves)`` and its backward of a fixed random gradient: ``[out, *leaf grads]``."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    out.backward(grad)
    return [out.detach(), *[t.grad for t in leaves]]


def _assert_same(got, expected):
    """Equal up to float32 rounding (other blocks sum in another order)."""
    for a, b in zip(got, expected, strict=True):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _record(monkeypatch, module, name, record):
    """Wrap ``module.name``: ``record(args, kwargs)`` before each call."""
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        record(args, kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


# ----- cvmm(..., config=) -----

CVMM_CONFIGS = [(32, 32, 16, 2, 1), (16, 64, 32, 4, 2)]


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("config", CVMM_CONFIGS)
@pytest.mark.parametrize(
    ("reduce", "d_in", "d_out"),
    [(False, 24, 40), (True, 24, 40), (True, 40, 24)],  # gather-mm, fused reduce, narrow products
)
def test_cvmm_config_keeps_the_result(backend, device, config, reduce, d_in, d_out, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, d_in, generator=g).to(device)
    w = (torch.randn(5, d_in, d_out, generator=g) / d_in**0.5).to(device)
    red = torch.rand(20, 2, generator=g).to(device)
    index = torch.randint(0, 5, (20, 2), generator=g).to(device)
    seen: list = []
    if backend == "triton":
        kernels = importlib.import_module("cvmm_kernel.triton_kernels")
        _record(monkeypatch, kernels, "_block_sizes", lambda args, kw: seen.append(args[2]))

    def layer(config):
        def fn(x, w, red):
            sel = cvmm_prepare_sel2(index, red if reduce else None)
            return cvmm(x, sel, w, backend=backend, config=config)

        return fn

    default = _run(layer(None), [x, w, red])
    assert all(c is None for c in seen)
    seen.clear()
    _assert_same(_run(layer(config), [x, w, red]), default)
    _assert_same(_run(layer(list(config)), [x, w, red]), default)  # any sequence
    if backend == "triton":  # every launch, the backward's included, took it
        assert len(seen) >= 2 * 3 and all(tuple(c) == config for c in seen)


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        ((48, 16, 16, 1, 1), ValueError, "config: BLOCK_M must be a power of two >= 16, got 48"),
        ((16, 8, 16, 1, 1), ValueError, "config: BLOCK_N must be a power of two >= 16"),
        ((16, 16, 0, 1, 1), ValueError, "config: BLOCK_K must be a power of two >= 16"),
        ((16, 16, 16, 3, 1), ValueError, "num_warps must be a power of two from 1 to 32, got 3"),
        ((16, 16, 16, 64, 1), ValueError, "num_warps must be a power of two from 1 to 32"),
        ((16, 16, 16, 1, 0), ValueError, "num_stages must be >= 1, got 0"),
        ((16, 16, 16, 1), ValueError, "config must have 5 values"),
        ((16, 16, 16, 1, 1, 1), ValueError, "config must have 5 values"),
        ((16.0, 16, 16, 1, 1), TypeError, "BLOCK_M must be an int"),
        ((16, 16, 16, True, 1), TypeError, "num_warps must be an int"),
        ("16,16,16,1,1", TypeError, "config must be a tuple of ints"),
        (16, TypeError, "config must be a tuple of ints"),
    ],
)
def test_cvmm_bad_config_raises_before_any_kernel(config, error, match, monkeypatch):
    ops = importlib.import_module("cvmm_kernel.ops")

    def no_op(*args, **kwargs):
        raise AssertionError("an op ran")

    monkeypatch.setattr(ops, "gather_mm", no_op)
    monkeypatch.setattr(ops, "gather_mm_reduce", no_op)
    x, w = torch.randn(6, 8), torch.randn(3, 8, 4)
    index = torch.randint(0, 3, (6, 2))
    for backend in ("reference", None):
        with pytest.raises(error, match=match):
            cvmm(x, cvmm_prepare_sel2(index), w, backend=backend, config=config)


class _CvmmLayer(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.w = torch.nn.Parameter(torch.randn(4, 16, 8) / 4)

    def forward(self, x):
        index = (x[..., :2].abs() * 100).long() % 4
        return cvmm(x, cvmm_prepare_sel2(index, x[..., 2:4].sigmoid()), self.w, config=self.config)


@pytest.mark.parametrize("device", DEVICES)
def test_cvmm_config_under_compile(device):
    torch.manual_seed(0)
    x = torch.randn(10, 16, device=device)
    assert_compiled_matches_eager(_CvmmLayer((32, 32, 16, 2, 1)).to(device), x)


# ----- moe_mlp / moe_linear(..., block_m=, gemm_configs=) -----

# the roles of moe_mlp at small sizes: every field in range, blocks up to 32 (so fitting to the
# sizes leaves them as they are)
MLP_CONFIGS = {
    "up": (32, 16, 2, 1),
    "down": (32, 32, 1, 2),
    "grad_hidden": (16, 32, 2, 1),
    "grad_input": (32, 16, 1, 1),
    "grad_w_up": (32, 16, 32, 2, 1),
    "grad_w_down": (16, 32, 16, 1, 1),
    "down_rows": (32, 2, 1),
    "grad_input_rows": (16, 1, 2),
    "fused_forward": (32, 16, 2, 1, 2),
}
LINEAR_CONFIGS = {
    "linear": (32, 16, 2, 1),
    "linear_rows": (16, 2, 2),
    "linear_grad_input": (16, 32, 1, 2),
    "linear_grad_input_rows": (32, 1, 1),
    "grad_w_linear": (16, 32, 32, 2, 1),
    "grad_w_linear_sorted": (32, 16, 32, 2, 1),
}


def _record_launches(monkeypatch):
    """Every moe kernel launch's ``(tile height, config)``."""
    kt = importlib.import_module("cvmm_kernel.moe_triton")
    launches: list = []
    for name in ("moe_gemm", "moe_gemm_rows", "moe_weight_grad"):
        _record(monkeypatch, kt, name, lambda a, kw: launches.append((a[3].block_m, kw["config"])))
    _record(monkeypatch, kt, "moe_mlp_rows",
            lambda a, kw: launches.append((a[6].block_m, kw["config"])))  # fmt: skip
    return launches


def _mlp_inputs(hidden, device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 24, generator=g)
    index = torch.rand(12, 4, generator=g).topk(2, dim=-1).indices
    gate = torch.rand(12, 2, generator=g)
    w_up = torch.randn(4, 24, hidden, generator=g) / 5
    w_down = torch.randn(4, hidden, 20, generator=g) / hidden**0.5
    return [t.to(device) for t in (x, gate, w_up, w_down)], index.to(device)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("hidden", [20, 136])  # row-tile kernels (hidden <= 128), general ones
@pytest.mark.parametrize(
    "launch",
    [
        dict(block_m=32),
        dict(gemm_configs=MLP_CONFIGS),
        dict(block_m=32, gemm_configs={"up": (16, 16, 1, 1)}, _backward_overlap=False),
    ],
    ids=["block_m", "gemm_configs", "mixed"],
)
def test_moe_mlp_launch_settings_keep_the_result(backend, device, hidden, launch, monkeypatch):
    leaves, index = _mlp_inputs(hidden, device)
    overlaps: list = []
    signature = inspect.signature(moe_ops._triton_backward)

    def record_overlap(args, kwargs):
        overlaps.append(signature.bind(*args, **kwargs).arguments.get("overlap"))

    _record(monkeypatch, moe_ops, "_triton_backward", record_overlap)

    def layer(**kw):
        return lambda x, gate, w_up, w_down: moe_mlp(
            x, index, gate, w_up, w_down, "gelu", backend=backend, **kw
        )

    default = _run(layer(), leaves)
    launches = _record_launches(monkeypatch) if backend == "triton" else []
    _assert_same(_run(layer(**launch), leaves), default)
    if backend != "triton":
        return
    assert overlaps == [None, launch.get("_backward_overlap")]
    shipped = moe_ops.block_m_for(backend)  # 16 under the interpreter, BLOCK_M on a GPU
    assert launches and {bm for bm, _ in launches} == {launch.get("block_m", shipped)}
    used = {cfg for _, cfg in launches}
    rows = hidden <= 128
    # the roles whose kernel does not run at this size: another kernel does their product
    idle = {"up", "down_rows", "down"} if rows else {"fused_forward", "down_rows"}
    idle |= {"grad_input"} if rows else {"grad_input_rows"}
    for role, cfg in launch.get("gemm_configs", {}).items():
        if role not in idle:
            assert cfg in used, role


LINEAR_CASES = [  # x, index, gate, weight, reduce_groups: a shared row, a row per group
    ((10, 24), (10, 3, 2), (4, 24, 40), False),
    ((10, 3, 136), (10, 3, 2), (4, 136, 24), True),
]


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize(("x_shape", "index_shape", "w_shape", "reduce_groups"), LINEAR_CASES)
@pytest.mark.parametrize(
    "launch",
    [dict(block_m=32), dict(gemm_configs=LINEAR_CONFIGS)],
    ids=["block_m", "gemm_configs"],
)
def test_moe_linear_launch_settings_keep_the_result(
    backend, device, x_shape, index_shape, w_shape, reduce_groups, launch, monkeypatch
):
    """The settings reach every sparse kernel (the dense slot layouts, which these 4 experts
    would take for some passes, run no kernel with a setting: off here)."""
    monkeypatch.setattr(importlib.import_module("cvmm_kernel.dense_slots"), "MAX_RATIO", [0.0])
    g = torch.Generator().manual_seed(2)
    x = torch.randn(x_shape, generator=g).to(device)
    weight = (torch.randn(w_shape, generator=g) / w_shape[1] ** 0.5).to(device)
    index = torch.rand(*index_shape[:-1], 4, generator=g).topk(2, dim=-1).indices.to(device)
    gate = torch.rand(index_shape, generator=g).to(device)

    def layer(**kw):
        return lambda x, gate, weight: moe_linear(
            x, index, gate, weight, reduce_groups=reduce_groups, backend=backend, **kw
        )

    default = _run(layer(), [x, gate, weight])
    launches = _record_launches(monkeypatch) if backend == "triton" else []
    _assert_same(_run(layer(**launch), [x, gate, weight]), default)
    if backend == "triton":
        shipped = moe_ops.block_m_for(backend)
        assert launches and {bm for bm, _ in launches} == {launch.get("block_m", shipped)}
        if "gemm_configs" in launch:  # every launch took one of the call's settings
            assert {cfg for _, cfg in launches} <= set(LINEAR_CONFIGS.values())


BAD_LAUNCHES = [
    (dict(block_m=48), ValueError, "block_m must be a power of two >= 16, got 48"),
    (dict(block_m=8), ValueError, "block_m must be a power of two >= 16"),
    (dict(block_m=True), TypeError, "block_m must be an int or None"),
    (dict(gemm_configs={"upp": (128, 64, 8, 3)}), ValueError, "unknown role 'upp'"),
    (dict(gemm_configs={"up": (128, 64, 8)}), ValueError, "must have 4 or 5 values"),
    (dict(gemm_configs={"up": (128, 64, 8, 3, 2)}), ValueError, "persistent must be a bool"),
    (dict(gemm_configs={"down_rows": (128, 3, 4)}), ValueError, "num_warps must be a power"),
    (dict(gemm_configs={"grad_w_up": (64, 128, 100, 4, 4)}), ValueError, "BLOCK_N must be"),
    (dict(gemm_configs={"linear": (128, 64, 8, 0)}), ValueError, "num_stages must be >= 1"),
    (dict(gemm_configs={"fused_forward": (64, 128, 4, 3)}), ValueError, "must have 5 values"),
    (dict(gemm_configs=[("up", (128, 64, 8, 3))]), TypeError, "gemm_configs must be a mapping"),
]


@pytest.mark.parametrize(("launch", "error", "match"), BAD_LAUNCHES)
@pytest.mark.parametrize("op", ["moe_mlp", "moe_linear"])
def test_moe_bad_launch_settings_raise_before_any_kernel(op, launch, error, match, monkeypatch):
    def no_routing(*args, **kwargs):
        raise AssertionError("the routing ran")

    monkeypatch.setattr(moe_ops, "routing_impl", no_routing)
    monkeypatch.setattr(importlib.import_module("cvmm_kernel.linear_ops"), "routing_impl",
                        no_routing)  # fmt: skip
    (x, gate, w_up, w_down), index = _mlp_inputs(20, "cpu")
    for backend in ("reference", None):
        with pytest.raises(error, match=match):
            if op == "moe_mlp":
                moe_mlp(x, index, gate, w_up, w_down, backend=backend, **launch)
            else:
                moe_linear(x, index, gate, w_up, backend=backend, **launch)


def test_moe_mlp_bad_backward_overlap():
    (x, gate, w_up, w_down), index = _mlp_inputs(20, "cpu")
    with pytest.raises(TypeError, match="_backward_overlap must be a bool or None"):
        moe_mlp(x, index, gate, w_up, w_down, _backward_overlap="yes")


def test_gemm_configs_through_the_custom_ops_schema():
    """The custom ops take the settings as a flat int list: every role survives the round
    trip, the persistent flag as 0 / 1; an empty mapping is the default."""
    configs = {**MLP_CONFIGS, **LINEAR_CONFIGS, "up": (128, 64, 8, 3, True)}
    checked = check_gemm_configs(configs)
    assert checked is not None and set(checked) <= set(GEMM_CONFIGS)
    flat = encode_gemm_configs(checked)
    assert flat is not None and all(type(v) is int for v in flat)
    assert decode_gemm_configs(flat) == {**configs, "up": (128, 64, 8, 3, 1)}
    assert check_gemm_configs({}) is None and encode_gemm_configs(None) is None
    assert decode_gemm_configs(None) is None


class _MoELayers(torch.nn.Module):
    """moe_mlp and moe_linear with non-default launch settings."""

    def __init__(self):
        super().__init__()
        self.router = torch.nn.Linear(24, 4, bias=False)
        self.w_up = torch.nn.Parameter(torch.randn(4, 24, 20) / 5)
        self.w_down = torch.nn.Parameter(torch.randn(4, 20, 24) / 5)
        self.w = torch.nn.Parameter(torch.randn(4, 24, 24) / 5)

    def forward(self, x):
        gate, index = self.router(x).sigmoid().topk(2, dim=-1)
        h = moe_mlp(x, index, gate, self.w_up, self.w_down, index_bound=4, block_m=32,
                    gemm_configs=MLP_CONFIGS, _backward_overlap=False)  # fmt: skip
        return moe_linear(h, index, gate, self.w, index_bound=4, block_m=32,
                          gemm_configs=LINEAR_CONFIGS)  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_moe_launch_settings_under_compile(device, monkeypatch):
    monkeypatch.setattr(importlib.import_module("cvmm_kernel.dense_slots"), "MAX_RATIO", [0.0])
    torch.manual_seed(0)
    assert_compiled_matches_eager(_MoELayers().to(device), torch.randn(10, 24, device=device))


@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cpu", marks=pytest.mark.interpret, id="interpret"),
        pytest.param("cuda", marks=pytest.mark.gpu, id="cuda"),
    ],
)
def test_weight_operand_descriptor_choice(device, monkeypatch):
    """Expert matrices go to the kernels as a tensor descriptor of themselves (code 1) or of
    their transpose (code 2) where TMA can load them, else as themselves (code 0); without
    ``EAGER_DESCRIPTORS``, on CUDA only in CUDA-graph capture."""
    from cvmm_kernel import moe_triton as kt

    if not kt.TENSOR_DESCRIPTORS[0] or not kt._has_tma(torch.device(device)):
        pytest.skip("this Triton or device has no tensor descriptors")
    w = torch.randn(3, 32, 64, device=device, dtype=torch.bfloat16)
    if device == "cuda":  # descriptors only in capture: eager calls take pointers
        monkeypatch.setattr(kt, "EAGER_DESCRIPTORS", [False])
        assert kt.weight_operand(w, 16, 32) == (w, 0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = kt.weight_operand(w, 16, 32)
        assert captured[1] == 1 and captured[0].base is w
        monkeypatch.setattr(kt, "EAGER_DESCRIPTORS", [True])
    arg, code = kt.weight_operand(w, 16, 32)
    assert code == 1 and arg.base is w and list(arg.block_shape) == [1, 16, 32]
    arg, code = kt.weight_operand(w.transpose(1, 2), 16, 32)
    assert code == 2 and list(arg.shape) == [3, 32, 64] and list(arg.block_shape) == [1, 32, 16]
    odd = torch.randn(3, 32, 63, device=device, dtype=torch.bfloat16)  # rows not 16-byte aligned
    assert kt.weight_operand(odd, 16, 32) == (odd, 0)
    assert kt.weight_operand(w[:, :, 1:], 16, 32)[1] == 0  # base not 16-byte aligned
    monkeypatch.setattr(kt, "TENSOR_DESCRIPTORS", [False])
    assert kt.weight_operand(w, 16, 32) == (w, 0)
