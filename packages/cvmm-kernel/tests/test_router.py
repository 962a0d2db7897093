"""sigmoid_topk: the Triton kernels (interpreter and CUDA) against the PyTorch expression it
replaces, ``sigmoid`` + top-k of the logits + ``gather`` (+ a per-group index offset): the same
indices bitwise (ties to the lower index, NaN first, dropped experts last) and the gates and
the logits' gradient within one rounding of the logits' dtype (float64 oracle)."""

from __future__ import annotations

import pytest
import torch
from cvmm_kernel import sigmoid_topk

from testing_support import TRITON_CUDA, TRITON_INTERPRET, rel_error

TRITON = [TRITON_INTERPRET, TRITON_CUDA]


def oracle(logits, k, drop=None, global_index=False):
    """float64: stable descending sort of the logits (NaN first, dropped last), the sigmoid of
    the chosen logits, and the logits' gradient of ``sum(gate * w)`` for ``w`` = 1..k."""
    x = logits.detach().double().requires_grad_()
    key = torch.nan_to_num(x.detach(), nan=float("inf"))
    if drop is not None:
        key = key.masked_fill(drop, float("-inf"))
    index = torch.sort(-key, dim=-1, stable=True).indices[..., :k]
    gate = torch.sigmoid(x).gather(-1, index)
    weights = torch.arange(1, k + 1, dtype=torch.float64)
    (grad,) = torch.autograd.grad((gate * weights).sum(), x)
    if global_index:
        e = logits.shape[-1]
        index = index + torch.arange(0, logits.shape[-2] * e, e)[:, None]
    return index, gate, grad


def check(logits, k, drop=None, global_index=False, backend="triton"):
    logits = logits.detach().requires_grad_()
    index, gate = sigmoid_topk(logits, k, drop=drop, global_index=global_index, backend=backend)
    want_index, want_gate, want_grad = oracle(
        logits.cpu(), k, None if drop is None else drop.cpu(), global_index
    )
    assert index.dtype == torch.int64 and gate.dtype == logits.dtype
    assert index.shape == gate.shape == (*logits.shape[:-1], k)
    assert torch.equal(index.cpu(), want_index)
    weights = torch.arange(1, k + 1, device=logits.device, dtype=logits.dtype)
    (gate * weights).sum().backward()
    tol = 1e-6 if logits.dtype == torch.float32 else 1e-2
    assert rel_error(gate, want_gate) < tol
    assert rel_error(logits.grad, want_grad) < tol
    assert logits.grad.shape == logits.shape


@pytest.mark.parametrize(("backend", "device"), TRITON)
@pytest.mark.parametrize(
    ("shape", "k"), [((64, 10), 2), ((37, 387), 16), ((3, 5, 40), 40), ((9, 1), 1)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_expression_it_replaces(backend, device, shape, k, dtype):
    g = torch.Generator().manual_seed(k)
    # few distinct values: many ties, which must go to the lower index
    logits = (torch.randint(-3, 4, shape, generator=g) / 2).to(dtype).to(device)
    check(logits, k)


@pytest.mark.parametrize(("backend", "device"), TRITON)
def test_heads_of_a_strided_projection_with_global_index_and_dropout(backend, device):
    """SwitchHead's logits: [B, T, H, E] views of a wider projection (rows that do not merge),
    expert numbers per head h offset by h * E, some experts dropped (they rank last)."""
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(2, 7, 2 * 4 * 10 + 6, generator=g).to(device)
    logits = wide[..., :80].view(2, 7, 2, 4, 10).unbind(-3)[1]  # [B, T, H=4, E=10]
    drop = (torch.rand(logits.shape, generator=g) < 0.3).to(device)
    drop[0, 0, 0] = True  # a head with every expert dropped still chooses k (lowest indices)
    check(logits, 2, drop=drop, global_index=True)
    check(logits, 3, global_index=True)


@pytest.mark.parametrize(("backend", "device"), TRITON)
def test_nan_ranks_first_and_padded_view(backend, device):
    wide = torch.randn(20, 392, generator=torch.Generator().manual_seed(1)).to(device)
    logits = wide[:, :387]  # sigma-MoE's padded selection logits
    logits[3, 7] = float("nan")
    index, gate = sigmoid_topk(logits, 16, backend=backend)
    assert index[3, 0] == 7 and torch.isnan(gate[3, 0])
    ok = torch.ones(20, dtype=torch.bool)
    ok[3] = False
    want_index, want_gate, _ = oracle(logits.cpu(), 16)
    assert torch.equal(index.cpu(), want_index)
    assert rel_error(gate[ok.to(device)], want_gate[ok]) < 1e-6


def test_reference_path_and_empty_inputs():
    logits = torch.randn(6, 3, 12, generator=torch.Generator().manual_seed(2))
    index, gate = sigmoid_topk(logits, 4, global_index=True)  # CPU: the PyTorch expression
    want_index, want_gate, _ = oracle(logits, 4, global_index=True)
    assert torch.equal(index, want_index) and rel_error(gate, want_gate) < 1e-6
    assert sigmoid_topk(logits[:0], 4)[0].shape == (0, 3, 4)
    assert sigmoid_topk(logits, 0)[1].shape == (6, 3, 0)


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ((torch.zeros(3, 4, dtype=torch.long), 1), {}, TypeError),
        ((torch.zeros(3, 4), 5), {}, ValueError),
        ((torch.zeros(3, 4), 1), {"drop": torch.zeros(3, 4)}, ValueError),
        ((torch.zeros(3, 4), 1), {"drop": torch.zeros(3, 5, dtype=torch.bool)}, ValueError),
        ((torch.zeros(4), 1), {"global_index": True}, ValueError),
    ],
)
def test_bad_inputs(args, kwargs, error):
    with pytest.raises(error):
        sigmoid_topk(*args, **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("shape", "k", "global_index"), [((96, 387), 16, False),
                                                          ((2, 48, 4, 10), 2, True)])  # fmt: skip
def test_compiled_graph_uses_the_kernels(shape, k, global_index):
    """Under ``torch.compile(fullgraph=True)`` the Triton kernels as ops of the graph: the
    eager indices and logits' gradient bitwise, the gates' weighted sum to float32 rounding
    (Inductor sums in its own order), expert dropout included."""
    g = torch.Generator(device="cuda").manual_seed(k)
    logits = torch.randn(shape, device="cuda", generator=g)
    drop = torch.rand(shape, device="cuda", generator=g) < 0.1
    weights = torch.rand(k, device="cuda", generator=g)

    def route(x):
        index, gate = sigmoid_topk(x, k, drop=drop, global_index=global_index)
        return index, (gate * weights).sum()

    results = []
    for fn in (route, torch.compile(route, fullgraph=True)):
        x = logits.clone().requires_grad_()
        index, total = fn(x)
        total.backward()
        results.append((index, total.detach(), x.grad))
    (index, total, grad), (c_index, c_total, c_grad) = results
    assert torch.equal(c_index, index) and torch.equal(c_grad, grad)
    torch.testing.assert_close(c_total, total, rtol=1e-6, atol=1e-6)
