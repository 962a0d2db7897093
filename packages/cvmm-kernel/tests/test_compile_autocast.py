"""torch.compile(fullgraph=True) through cvmm, and autocast behaviour."""

from __future__ import annotations

import pytest
import torch
from cvmm_kernel import cvmm, cvmm_prepare_sel2

from testing_support import DEVICES, assert_compiled_matches_eager


class TinyMoE(torch.nn.Module):
    """Top-k expert FFN on cvmm: the way sigma-MoE uses it."""

    def __init__(self, d: int = 16, n_experts: int = 6, hidden: int = 8, k: int = 2):
        super().__init__()
        self.k = k
        self.gate = torch.nn.Linear(d, n_experts, bias=False)
        self.up = torch.nn.Parameter(torch.randn(n_experts, d, hidden) / d**0.5)
        self.down = torch.nn.Parameter(torch.randn(n_experts, hidden, d) / hidden**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.gate(x).sigmoid()
        weight, index = scores.topk(self.k, dim=-1)
        hidden = torch.relu(cvmm(x, cvmm_prepare_sel2(index), self.up))
        sel = cvmm_prepare_sel2(index, weight)
        sel.sel_index = sel.out_index  # hidden has one row per (token, choice)
        return cvmm(hidden, sel, self.down)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    torch.manual_seed(0)
    model = TinyMoE().to(device)
    x = torch.randn(3, 5, 16, device=device)
    assert_compiled_matches_eager(model, x)


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        ("cpu", torch.bfloat16),
        pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
        pytest.param("cuda", torch.float16, marks=pytest.mark.gpu),
    ],
)
def test_autocast_output_dtype_follows_matmul(device, dtype):
    x = torch.randn(8, 16, device=device)
    w = torch.randn(3, 16, 4, device=device, requires_grad=True)
    sel = torch.randint(0, 3, (8,), device=device)
    gate = torch.rand(8, 2, device=device)
    with torch.autocast(device, dtype=dtype):
        out = cvmm(x, sel, w)
        reduced = cvmm(x, cvmm_prepare_sel2(torch.randint(0, 3, (8, 2), device=device), gate), w)
        expected_dtype = (x @ w[0]).dtype
    assert out.dtype == reduced.dtype == expected_dtype == dtype
    (out.float().sum() + reduced.float().sum()).backward()
    assert w.grad is not None and w.grad.dtype == torch.float32


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        ("cpu", torch.bfloat16),
        pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
        pytest.param("cuda", torch.float16, marks=pytest.mark.gpu),
    ],
)
@pytest.mark.parametrize("reduced", [False, True])
def test_autocast_saves_no_low_precision_weight_copy(device, dtype, reduced):
    """Under autocast the graph keeps the fp32 weight itself (no per-call cast copy for the
    backward), and the gradients equal those of an explicit cast done by the caller."""
    torch.manual_seed(0)
    x = torch.randn(12, 16, device=device)
    w = torch.randn(3, 16, 32, device=device, requires_grad=True)
    index = torch.randint(0, 3, (12, 2), device=device)
    gate = torch.rand(12, 2, device=device, requires_grad=True)
    sel = cvmm_prepare_sel2(index, gate if reduced else None)
    saved = []
    record = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t)
    with record, torch.autocast(device, dtype=dtype):
        out = cvmm(x, sel, w)
    assert not any(t.shape == w.shape and t.dtype == dtype for t in saved)
    assert any(t is w for t in saved)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (w, gate) if reduced else (w,), g)
    w_low = w.detach().to(dtype).requires_grad_()
    expected = cvmm(x.to(dtype), sel, w_low)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    want = torch.autograd.grad(expected, (w_low, gate) if reduced else (w_low,), g)
    assert grads[0].dtype == torch.float32
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref.to(got.dtype), rtol=2e-2, atol=2e-2)
