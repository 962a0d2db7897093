"""Compiled MoE calls on the Triton path launch their kernels from the compiled graph itself
(``cvmm_kernel.traced_ops``): the triton_op twins of the routing and MoE ops, traced by Inductor,
against the opaque custom ops and eager."""

from __future__ import annotations

import pytest
import torch
from cvmm_kernel import moe_linear, moe_mlp, traced_ops
from cvmm_kernel.moe_ops import moe_routing, moe_routing_traced
from cvmm_kernel.moe_triton import _int32_views

from testing_support import rel_error

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


class _Feedforward(torch.nn.Module):
    def __init__(self, d=32, n_experts=12, hid=16, k=4):
        super().__init__()
        self.k = k
        self.sel = torch.nn.Linear(d, n_experts, bias=False)
        self.w_up = torch.nn.Parameter(torch.randn(n_experts, d, hid) / d**0.5)
        self.w_down = torch.nn.Parameter(torch.randn(n_experts, hid, d) / hid**0.5)

    def forward(self, x):
        gate, index = self.sel(x).sigmoid().topk(self.k, dim=-1)
        bound = self.w_up.shape[0]
        return moe_mlp(x, index, gate, self.w_up, self.w_down, "gelu", index_bound=bound)


class _Projections(torch.nn.Module):
    """SwitchHead's value and output projections (``n_experts`` per head, two chosen: by pairs
    of experts with 8 per head on CUDA, dense slot layouts with 3)."""

    def __init__(self, d=32, heads=2, n_experts=8, d_head=16):
        super().__init__()
        self.heads, self.n_experts = heads, n_experts
        self.sel = torch.nn.Linear(d, heads * n_experts, bias=False)
        self.v = torch.nn.Parameter(torch.randn(heads * n_experts, d, d_head) / d**0.5)
        self.o = torch.nn.Parameter(torch.randn(heads * n_experts, d_head, d) / d_head**0.5)

    def forward(self, x):
        scores = self.sel(x).view(*x.shape[:-1], self.heads, self.n_experts).sigmoid()
        gate, index = scores.topk(2, dim=-1)
        index = index + torch.arange(self.heads, device=x.device)[:, None] * self.n_experts
        bound = self.heads * self.n_experts
        v = moe_linear(x, index, gate, self.v, index_bound=bound)
        return moe_linear(v, index, gate, self.o, reduce_groups=True, index_bound=bound)


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
    "make", [_Feedforward, _Projections, lambda: _Projections(n_experts=3)],
    ids=["moe_mlp", "moe_linear_pairs", "moe_linear_dense_slots"],
)  # fmt: skip
def test_compiled_graph_launches_the_kernels(make):
    """With the triton_op twins no opaque MoE op is called from the compiled forward or
    backward, and outputs and gradients are eager's to float32 rounding (Inductor reorders the
    selection's sums: norms of the differences within 1e-5 of the gradients'); with
    ``TRACED_OPS`` off the graph calls the opaque ops (same results)."""
    torch.manual_seed(0)
    model = make().cuda()
    x = torch.randn(4, 64, 32, device="cuda")
    eager = model(x)
    eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
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
    """Compiled for dynamic sizes the graph calls the opaque ops (``traced_ops.pick``), with
    eager's results."""
    torch.manual_seed(0)
    model = _Feedforward().cuda()
    x = torch.randn(4, 48, 32, device="cuda")
    eager = model(x)
    eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    try:
        out, grads, code = _compiled_step(model, x, dynamic=True)
    finally:
        torch._dynamo.reset()
    assert any(name in code for name in OPAQUE_CALLS)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, eager_grads):
        assert rel_error(got, want) < 1e-5
