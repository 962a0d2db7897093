"""``cvmm_kernel.launcher.launch``: the direct launch and the kept tensor-descriptor encodings
give what ``kernel[grid]`` gives, for every weight a kernel is launched with (CUDA)."""

from __future__ import annotations

import pytest
import torch
import triton
from cvmm_kernel import launcher, moe_linear, moe_mlp, moe_triton

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _mlp_step(x, index, gate, w_up, w_down):
    leaves = [t.detach().clone().requires_grad_() for t in (x, gate, w_up, w_down)]
    out = moe_mlp(leaves[0], index, leaves[1], leaves[2], leaves[3], "relu", index_bound=16)
    out.backward(torch.ones_like(out))
    return [out.detach(), *[t.grad for t in leaves]]


@pytest.mark.gpu
@cuda
def test_kept_descriptors_give_the_per_launch_result(monkeypatch):
    """Weights at other addresses and of other shapes, and a weight changed in place, through
    kept encodings (and the kernels without descriptors through the launcher's C entry point):
    bitwise what Triton's launcher object and plain ``kernel[grid]`` give."""
    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    x = torch.randn(96, 64, device=dev, dtype=bf16)
    index = torch.randint(0, 16, (96, 4), device=dev)
    gate = torch.rand(96, 4, device=dev, dtype=bf16)
    weights = [
        (torch.randn(16, 64, h, device=dev, dtype=bf16), torch.randn(16, h, 64, device=dev,
         dtype=bf16)) for h in (32, 32, 48)
    ]  # fmt: skip
    launcher._COMPILED.clear()

    def all_results():
        results = [_mlp_step(x, index, gate, *w) for w in weights]
        weights[0][0].mul_(0.5)  # same address, new values
        results.append(_mlp_step(x, index, gate, *weights[0]))
        weights[0][0].mul_(2.0)
        return results

    kept = all_results()
    kept_again = all_results()  # every launch now from the kept entries
    entries = [e for e in launcher._COMPILED.values() if e[2] is not None]
    monkeypatch.setattr(launcher, "KEEP_DESCRIPTORS", [False])
    encoded = all_results()
    monkeypatch.setattr(launcher, "_FAST_LAUNCH", [False])
    plain = all_results()
    for got in (kept, kept_again, encoded):
        for a_case, b_case in zip(got, plain, strict=True):
            for a, b in zip(a_case, b_case, strict=True):
                assert torch.equal(a, b)
    tma = moe_triton.TENSOR_DESCRIPTORS[0] and torch.cuda.get_device_capability() >= (9, 0)
    if tma and triton.__version__.startswith("3.6."):  # the launcher layout the module knows
        assert any(e[2].positions for e in entries)  # kept encodings
        assert any(not e[2].positions for e in entries)  # plain kernels' C entry point


@pytest.mark.gpu
@cuda
def test_launch_hook_goes_through_triton(monkeypatch):
    """With a launch hook set, launches go through Triton's runner (the hook sees them)."""
    x = torch.randn(32, 16, device="cuda", dtype=torch.bfloat16)
    index = torch.randint(0, 4, (32, 2, 2), device="cuda")
    gate = torch.rand(32, 2, 2, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4, 16, 8, device="cuda", dtype=torch.bfloat16)
    expected = moe_linear(x, index, gate, w, index_bound=4)
    seen = []
    hooks = launcher._HOOKS
    monkeypatch.setattr(hooks, "launch_enter_hook", lambda *args: seen.append(1))
    got = moe_linear(x, index, gate, w, index_bound=4)
    assert seen
    assert torch.equal(got, expected)


class _Descriptor(launcher._DESCRIPTOR):
    """A stand-in tensor descriptor (only what the kept encodings read)."""

    def __init__(self, base, shape, strides, block_shape=(16, 16), padding="zero"):
        self.base, self.shape, self.strides = base, list(shape), list(strides)
        self.block_shape, self.padding = list(block_shape), padding


@pytest.mark.skipif(not launcher.DESCRIPTORS_AVAILABLE, reason="needs Triton >= 3.3")
def test_kept_encodings_splice_and_key_on_what_is_encoded():
    """Each descriptor argument is replaced by its encoded arguments in place, the others kept in
    order; an encoding is made once per (position, address, shape, strides, padding)."""
    calls = []

    def encode(d, meta):
        calls.append((d.base.data_ptr(), tuple(d.shape), meta))
        return [f"map{len(calls)}", *d.shape, *d.strides]

    kept = launcher._KeptDescriptors("entry", (), [1, 3], ["m1", "m3"], encode)
    a, b = torch.zeros(4, 8), torch.zeros(4, 8)
    args = (7, _Descriptor(a, (4, 8), (8, 1)), "x", _Descriptor(b, (4, 8), (8, 1)), 9)
    assert kept.args(args) == [7, "map1", 4, 8, 8, 1, "x", "map2", 4, 8, 8, 1, 9]
    assert kept.args(args) == [7, "map1", 4, 8, 8, 1, "x", "map2", 4, 8, 8, 1, 9]  # kept
    assert len(calls) == 2 and [c[2] for c in calls] == ["m1", "m3"]
    other = (7, _Descriptor(a, (2, 8), (8, 1)), "x", _Descriptor(b, (4, 8), (1, 4)), 9)
    assert kept.args(other)[1] == "map3" and kept.args(other)[7] == "map4"
    assert len(calls) == 4


def test_unknown_launcher_layouts_keep_the_per_launch_encoding():
    """A launcher without the layout the module knows gives no kept encodings (the plain path)."""

    class Launcher:
        def launch(self, *args):
            return None

    args = (torch.zeros(2), _Descriptor(torch.zeros(4), (4,), (1,)), 3)
    if launcher.DESCRIPTORS_AVAILABLE:
        assert launcher._kept_descriptors(Launcher(), args) is None
    assert launcher._kept_descriptors(Launcher(), (torch.zeros(2), 3)) is None


def test_signature_keys_tensors_by_dtype_and_alignment_and_the_rest_by_value():
    def kernel():
        pass

    t = torch.zeros(8)
    args = (t, t[1:], 3, None, 2.0, True, "s", torch.float32)
    assert launcher._signature(kernel, 0, args, (4, 3, False)) == (
        id(kernel), (4, 3, False), 0, (torch.float32, True), (torch.float32, False), 3, None,
        2.0, True, "s", torch.float32,
    )  # fmt: skip


@pytest.mark.skipif(launcher._DESCRIPTOR_REST is None, reason="no dataclass TensorDescriptor")
def test_unchecked_descriptor_equals_the_checked_one(monkeypatch):
    """``launcher.descriptor`` outside the interpreter skips the dataclass's checks and gives an
    object equal to ``TensorDescriptor(...)`` field by field."""
    w = torch.randn(4, 32, 64)
    args = (w, [4, 32, 64], [32 * 64, 64, 1], [1, 16, 32])
    checked = launcher._DESCRIPTOR(*args)
    monkeypatch.setattr(launcher, "interpreting", lambda: False)
    fast = launcher.descriptor(*args)
    assert type(fast) is type(checked) is launcher._DESCRIPTOR
    assert fast == checked  # the dataclass's __eq__: every field
    assert fast.base is w and vars(fast) == vars(checked)


@pytest.mark.gpu
def test_multiprocessors_is_the_device_property():
    device = torch.device("cuda")
    want = torch.cuda.get_device_properties(device).multi_processor_count
    assert launcher.multiprocessors(device) == want
    assert launcher.multiprocessors(torch.device("cuda", torch.cuda.current_device())) == want
