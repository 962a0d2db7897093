"""Compiled MoE calls on the Triton path launch their kernels from the compiled graph itself
(``cvmm_kernel.traced_ops``): the triton_op twins of the routing and MoE ops, traced by Inductor,
against the opaque custom ops and eager."""

from __future__ import annotations

import pytest
import torch
from cvmm_kernel import traced_ops
from cvmm_kernel.moe_ops import moe_routing, moe_routing_traced
from cvmm_kernel.moe_triton import _int32_views

from testing_support import TinyExpertProjections, TinySigmaMoE, rel_error

# the opaque ops by the name a compiled graph's wrapper calls them with
OPAQUE_CALLS = ("cvmm_kernel.moe_mlp_", "cvmm_kernel.moe_linear_", "cvmm_kernel.moe_routing",
                "cvmm_kernel.moe_pair_routing")  # fmt: skip


def test_pick_keeps_the_reference_opaque():
    """A traced body would not survive the reference's data-dependent shapes."""
    assert traced_ops.pick(moe_routing, moe_routing_traced, "reference") is moe_routing
    assert traced_ops.pick(moe_routing, moe_routing_traced, "triton") is moe_routing_traced
    traced_ops.TRACED_OPS[0] = False
    try:
        assert traced_ops.pick(moe_routing, moe_routing_traced, "triton") is moe_routing
    finally:
        traced_ops.TRACED_OPS[0] = True


def test_scratch_apart_has_its_own_storage():
    apart = _int32_views(torch.device("cpu"), 5, 40, 3, zero=True, apart=True)
    joined = _int32_views(torch.device("cpu"), 5, 40, 3)
    assert [t.numel() for t in apart] == [5, 40, 3] == [t.numel() for t in joined]
    assert len({t.untyped_storage().data_ptr() for t in apart}) == 3
    assert len({t.untyped_storage().data_ptr() for t in joined}) == 1
    assert all(int(t.abs().sum()) == 0 for t in apart)


def _feedforward():
    return TinySigmaMoE(d=32, n_experts=12, hid=16, k=4)


def _projections(n_experts=8):
    return TinyExpertProjections(d=32, n_experts=n_experts, d_head=16)


def _eager_step(make, tokens=64):
    """A CUDA model from ``make``, an input, its eager output and parameter gradients."""
    torch.manual_seed(0)
    model = make().cuda()
    x = torch.randn(4, tokens, 32, device="cuda")
    eager = model(x)
    eager.square().sum().backward()
    return model, x, eager, [p.grad.clone() for p in model.parameters()]


def _compiled_step(model, x, dynamic=None):
    """Output, parameter gradients and the generated code of a compiled forward + backward."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic)

    def step():
        model.zero_grad()
        out = compiled(x)
        out.square().sum().backward()
        return out.detach()

    out, code = run_and_get_code(step)
    return out, [p.grad.clone() for p in model.parameters()], "\n".join(code)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "make", [_feedforward, _projections, lambda: _projections(n_experts=3)],
    ids=["moe_mlp", "moe_linear_pairs", "moe_linear_dense_slots"],
)  # fmt: skip
def test_compiled_graph_launches_the_kernels(make):
    """With the triton_op twins no opaque MoE op is called from the compiled forward or
    backward, and outputs and gradients are eager's to float32 rounding (Inductor reorders the
    selection's sums: norms of the differences within 1e-5 of the gradients'); with
    ``TRACED_OPS`` off the graph calls the opaque ops (same results). SwitchHead's projections
    run by pairs of experts with 8 per head, on the dense slot layouts with 3."""
    model, x, eager, eager_grads = _eager_step(make)
    try:
        out, grads, code = _compiled_step(model, x)
        traced_ops.TRACED_OPS[0] = False
        opaque_out, opaque_grads, opaque_code = _compiled_step(model, x)
    finally:
        traced_ops.TRACED_OPS[0] = True
        torch._dynamo.reset()
    assert not [name for name in OPAQUE_CALLS if name in code]
    assert any(name in opaque_code for name in OPAQUE_CALLS)
    for got in (out, opaque_out):
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    for got_grads in (grads, opaque_grads):  # (a few of the small entries differ by 1e-5)
        for got, want in zip(got_grads, eager_grads):
            assert rel_error(got, want) < 1e-5


@pytest.mark.gpu
def test_dynamic_shapes_take_the_opaque_ops():
    """Compiled for dynamic sizes the graph calls the opaque ops (the twins' bodies call them,
    ``traced_ops.twin_ops``), with eager's results."""
    model, x, eager, eager_grads = _eager_step(_feedforward, tokens=48)
    try:
        out, grads, code = _compiled_step(model, x, dynamic=True)
    finally:
        torch._dynamo.reset()
    assert any(name in code for name in OPAQUE_CALLS)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, eager_grads):
        assert rel_error(got, want) < 1e-5
