"""switchhead.shared_projection: a layer applied several times in one forward shares its fused
input-projection weight and sums its weight gradient in one buffer; the same outputs and
gradients as with every application on its own (float32: to float32 sum order)."""

from __future__ import annotations

import pytest
import torch
from switchhead import SwitchHeadRope, SwitchHeadXL, shared_projection
from switchhead.shared_projection import share_input_projections

from testing_support import DEVICES, assert_rel_close

LAYERS = {
    "rope, cvmm experts": lambda: SwitchHeadRope(32, 2, 4, d_head=8, expert_impl="cvmm"),
    "rope, dense experts, padded heads": lambda: SwitchHeadRope(
        32, 2, 4, d_head=10, expert_impl="dense"
    ),
    "rope, one expert": lambda: SwitchHeadRope(32, 2, 1, d_head=8),
    "xl": lambda: SwitchHeadXL(32, 2, 4, d_head=8, backend="reference"),
}


def _run(layer, x, enabled, monkeypatch, *, passes=1, autocast=False, cross=False):
    """Three applications in one forward (one of them cross-attention where ``cross``):
    the output and every gradient."""
    monkeypatch.setattr(shared_projection, "ENABLED", [enabled])
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with (
        share_input_projections([layer]),
        torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast),
    ):
        h = x
        for i in range(3):
            source = x if cross and i == 1 else h
            h = h + layer(h, source, source)[0].float()
    loss = (h.square() * torch.linspace(0.5, 1.5, h.shape[-1], device=h.device)).sum()
    for p in range(passes):
        loss.backward(retain_graph=p + 1 < passes)
    return [h.detach(), x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("cross", [False, True], ids=["self", "one cross"])
def test_same_outputs_and_gradients(name, cross, monkeypatch):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    x = torch.randn(2, 6, 32)
    shared = _run(layer, x, True, monkeypatch, cross=cross)
    plain = _run(layer, x, False, monkeypatch, cross=cross)
    for a, b in zip(shared, plain, strict=True):
        if b is None:
            assert a is None
        else:
            assert_rel_close(a, b, 1e-5)


def test_fused_weight_made_once_and_gradient_summed_once(monkeypatch):
    """One fusion per forward for the weight, one for the gradients' split (not one per
    application); a second backward pass through a retained graph adds a second sum."""
    torch.manual_seed(1)
    layer = LAYERS["rope, cvmm experts"]()
    x = torch.randn(2, 5, 32)
    fusions = []
    fused_rows = layer._fused_rows
    monkeypatch.setattr(
        layer, "_fused_rows", lambda *a, **k: fusions.append(1) or fused_rows(*a, **k)
    )
    shared = _run(layer, x, True, monkeypatch, passes=2)
    assert len(fusions) == 3  # the forward's, and the split of each pass's sum
    fusions.clear()
    plain = _run(layer, x, False, monkeypatch, passes=2)
    assert len(fusions) == 3  # one per application
    for a, b in zip(shared[2:], plain[2:], strict=True):
        assert_rel_close(a, b, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_under_bf16_autocast(device, monkeypatch):
    """bf16 autocast: the shared weight is the per-application cast's values; its gradient sum
    stays in float32 (the plain path rounds each application's to bf16), so within bf16. On
    CUDA the sum is cuBLAS' float32-output mm / addmm."""
    torch.manual_seed(2)
    layer = LAYERS["rope, cvmm experts"]().to(device)
    x = torch.randn(2, 6, 32, device=device)
    shared = _run(layer, x, True, monkeypatch, autocast=True)
    plain = _run(layer, x, False, monkeypatch, autocast=True)
    for a, b in zip(shared, plain, strict=True):
        assert_rel_close(a, b, 3e-2)


def test_a_parameter_changed_before_the_backward_raises(monkeypatch):
    monkeypatch.setattr(shared_projection, "ENABLED", [True])
    layer = LAYERS["rope, cvmm experts"]()
    x = torch.randn(1, 4, 32)
    with share_input_projections([layer]):
        out = layer(x, x, x)[0]
    with torch.no_grad():
        layer.q.weight.add_(1)
    with pytest.raises(RuntimeError, match="modified in place between the forward"):
        out.sum().backward()


def test_inactive_without_gradients_or_when_disabled(monkeypatch):
    layer = LAYERS["rope, cvmm experts"]()
    monkeypatch.setattr(shared_projection, "ENABLED", [True])
    with torch.no_grad(), share_input_projections([layer]):
        assert shared_projection.rows_of(layer) is None
    monkeypatch.setattr(shared_projection, "ENABLED", [False])
    with share_input_projections([layer]):
        assert shared_projection.rows_of(layer) is None
    monkeypatch.setattr(shared_projection, "ENABLED", [True])
    with share_input_projections([layer]):
        assert shared_projection.rows_of(layer) is not None
    assert shared_projection.rows_of(layer) is None  # after the block


def test_forward_graph_freed_without_the_garbage_collector(monkeypatch):
    """No reference cycle through the shared rows: once the loss is gone, the forward's graph
    (and the rows) go with it at once. A cycle would keep an old step's AccumulateGrad nodes
    alive, which breaks a later CUDA-graph capture."""
    import gc
    import weakref

    monkeypatch.setattr(shared_projection, "ENABLED", [True])
    layer = LAYERS["rope, cvmm experts"]()
    x = torch.randn(2, 5, 32)
    gc.collect()
    gc.disable()
    try:
        with share_input_projections([layer]):
            rows = weakref.ref(shared_projection.rows_of(layer))
            out = layer(layer(x, x, x)[0], x, x)[0]
        out.square().sum().backward()
        assert rows() is not None  # (out's graph is still referenced)
        del out
        assert rows() is None
    finally:
        gc.enable()


def test_second_derivative_raises(monkeypatch):
    """The shared weight is made without a graph: differentiating the backward again raises
    instead of leaving out the parameters' terms."""
    monkeypatch.setattr(shared_projection, "ENABLED", [True])
    layer = LAYERS["rope, dense experts, padded heads"]()
    x = torch.randn(2, 5, 32, requires_grad=True)
    with share_input_projections([layer]):
        out = layer(layer(x, x, x)[0], x, x)[0]
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()
