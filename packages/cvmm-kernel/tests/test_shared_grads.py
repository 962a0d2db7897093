"""accumulate_weight_grads: a weight used several times in one forward gets the same gradient
when the MoE kernels sum its uses (the first use writes, the others add in the weight-gradient
kernel) as when autograd sums them; partial and repeated backward passes included."""

from __future__ import annotations

import pytest
import torch
from cvmm_kernel import accumulate_weight_grads, moe_linear, moe_mlp, sigmoid_topk

from testing_support import BACKENDS, rel_error


def make(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, generator=g).to(device)
    weights = {
        "up": t(6, 16, 8) / 4,
        "down": t(6, 8, 16) / 3,
        "v": t(2 * 3, 16, 8) / 4,  # 2 heads x 3 experts
        "o": t(2 * 3, 8, 16) / 3,
    }
    return t(2, 5, 16), {k: w.requires_grad_() for k, w in weights.items()}


def forward(x, w, backend, repeats=3):
    """A shared layer applied ``repeats`` times: SwitchHead-like value/output experts, then a
    sigma-MoE feedforward, each with its own top-k choice (float32)."""
    h = x
    for _ in range(repeats):
        att_logits = h[..., :6].unflatten(-1, (2, 3))
        index, gate = sigmoid_topk(att_logits, 2, global_index=True, backend=backend)
        v = moe_linear(h, index, gate, w["v"], backend=backend)  # [B, T, 2, 8]
        h = h + moe_linear(v, index, gate, w["o"], reduce_groups=True, backend=backend)
        ff_index, ff_gate = sigmoid_topk(h[..., 6:12], 2, backend=backend)
        h = h + moe_mlp(h, ff_index, ff_gate, w["up"], w["down"], backend=backend)
    return h + w["up"].mean()  # a direct use too: autograd adds it to the kernels' sum


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_same_gradients_as_autograd_sums(backend, device, monkeypatch):
    import cvmm_kernel.shared_grads as shared_grads

    sums = []  # each use's gradient reaching a shared sum: in the kernel (target) or added
    for name in ("target", "add"):
        method = getattr(shared_grads.SharedGrad, name)
        spy = lambda self, t, method=method, name=name: sums.append(name) or method(self, t)
        monkeypatch.setattr(shared_grads.SharedGrad, name, spy)
    x, w = make(device)
    forward(x, w, backend).square().sum().backward()
    want = {k: v.grad.clone() for k, v in w.items()}
    for v in w.values():
        v.grad = None
    with accumulate_weight_grads(w.values()):
        out = forward(x, w, backend)
    out.square().sum().backward()
    assert len(sums) == 4 * 3  # every use of the four weights, none through autograd's sum
    for k, v in w.items():
        assert v.grad is not None and rel_error(v.grad, want[k]) < 1e-5, k
    # a second backward pass through a retained graph starts a new sum
    for v in w.values():
        v.grad = None
    with accumulate_weight_grads(w.values()):
        out = forward(x, w, backend)
    out.square().sum().backward(retain_graph=True)
    out.square().sum().backward()
    for k, v in w.items():
        assert rel_error(v.grad, 2 * want[k]) < 1e-5, k


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_partial_backward_and_no_grad(backend, device):
    x, w = make(device)
    with torch.no_grad(), accumulate_weight_grads(w.values()):  # inactive: nothing to sum
        forward(x, w, backend)
    with accumulate_weight_grads(w.values()):
        out = forward(x, w, backend)
    (gx,) = torch.autograd.grad(out.sum(), [w["up"]])  # only one weight asked for
    assert all(v.grad is None for v in w.values())
    want = torch.autograd.grad(forward(x, w, backend).sum(), [w["up"]])[0]
    assert rel_error(gx, want) < 1e-5


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("dense_slots", [False, True])
def test_deferred_gradients_are_one_gemm_per_weight(backend, device, dense_slots, monkeypatch):
    """``deferred=True``: the Triton path keeps every use's weight-gradient GEMM and runs one per
    weight over all uses (renumbered slots, both gather modes, the gate); the same gradients as
    autograd's sum, for one and for two backward passes through a retained graph. With
    ``dense_slots`` the value and output experts (3 per head, 2 chosen) take moe_linear's dense
    layouts, whose matmuls add each use's gradient to the sum at once: only the feedforward's
    weights are deferred."""
    import cvmm_kernel.dense_slots
    import cvmm_kernel.moe_ops as moe_ops
    import cvmm_kernel.moe_triton as moe_triton

    monkeypatch.setattr(cvmm_kernel.dense_slots, "MAX_RATIO", [2.0 if dense_slots else 0.0])
    deferred_weights = 2 if dense_slots else 4

    combined, gemms = [], []
    original = moe_ops.combined_weight_grad
    spy = lambda uses: combined.append(len(uses)) or original(uses)
    monkeypatch.setattr(moe_ops, "combined_weight_grad", spy)
    launch = moe_triton.moe_weight_grad
    monkeypatch.setattr(
        moe_triton, "moe_weight_grad", lambda *a, **k: gemms.append(1) or launch(*a, **k)
    )
    x, w = make(device, seed=1)
    forward(x, w, backend).square().sum().backward()
    want = {k: v.grad.clone() for k, v in w.items()}
    for v in w.values():
        v.grad = None
    combined.clear()
    gemms.clear()
    with accumulate_weight_grads(w.values(), deferred=True):
        out = forward(x, w, backend)
    for passes in (1, 2):  # a second pass through the retained graph adds a second sum
        out.square().sum().backward(retain_graph=passes == 1)
        # the reference path has no GEMM to defer: it adds each use's gradient as before
        triton = backend == "triton"
        assert combined == ([3] * deferred_weights * passes if triton else [])
        assert len(gemms) == (deferred_weights * passes if triton else 0)  # one per weight
        for k, v in w.items():
            assert rel_error(v.grad, passes * want[k]) < 1e-5, (k, passes)


def _pending(g, n_experts, tokens, top_k, k, n, a_gather, b_gather, with_gate, device):
    """One use's weight-gradient GEMM with a random expert per slot, and its float64 oracle
    ``dW[e] = sum over the slots s of e of (gate_s *) a[row_a(s)]^T b[row_b(s)]``."""
    from cvmm_kernel.moe_ops import PendingWeightGrad

    slots = tokens * top_k
    expert = torch.randint(0, n_experts, (slots,), generator=g)
    sorted_to_slot = torch.sort(expert, stable=True).indices
    offsets = torch.zeros(n_experts + 1, dtype=torch.long)
    offsets[1:] = torch.bincount(expert, minlength=n_experts).cumsum(0)
    a = torch.randn(tokens if a_gather else slots, k, generator=g)
    b = torch.randn(tokens if b_gather else slots, n, generator=g)
    gate = torch.rand(slots, generator=g) if with_gate else None
    rows_a = sorted_to_slot // top_k if a_gather else torch.arange(slots)
    rows_b = sorted_to_slot // top_k if b_gather else torch.arange(slots)
    scale = gate[sorted_to_slot].double() if gate is not None else torch.ones(slots).double()
    want = torch.zeros(n_experts, k, n, dtype=torch.float64)
    want.index_add_(0, expert[sorted_to_slot],
                    torch.einsum("pk,pn->pkn", a[rows_a].double() * scale[:, None],
                                 b[rows_b].double()))  # fmt: skip
    like = torch.empty(n_experts, k, n, device=device)
    use = PendingWeightGrad(
        a.to(device), b.to(device), sorted_to_slot.int().to(device), offsets.int().to(device),
        None if gate is None else gate.to(device), top_k, None, a_gather, b_gather,
        (16, 16, 16, 1, 1), like,
    )  # fmt: skip
    return use, want


@pytest.mark.interpret
@pytest.mark.parametrize(("a_gather", "b_gather"), [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("alike", [True, False], ids=["one GEMM", "one by one"])
def test_combined_weight_grad_matches_its_oracle(a_gather, b_gather, alike):
    """The combined GEMM of uses with other expert counts (some experts empty in a use) equals
    the sum of their gradients; uses whose settings differ (a gate in one only) run one by one."""
    from cvmm_kernel.moe_ops import combined_weight_grad

    g = torch.Generator().manual_seed(4)
    uses, want = [], 0
    for i, tokens in enumerate((5, 9, 3)):
        gate = alike or i == 1  # alike: a gate in every use; else in the second only
        use, oracle = _pending(g, 6, tokens, 2, 24, 20, a_gather, b_gather, gate, "cpu")
        uses.append(use)
        want = want + oracle
    assert rel_error(combined_weight_grad(uses), want) < 1e-5


@pytest.mark.interpret
@pytest.mark.parametrize("split", [2, 3])
def test_weight_grad_row_ranges_match_the_oracle(split):
    """Each expert's rows cut into ``split`` ranges (some empty: experts of ~18 rows in blocks of
    16) give the whole-rows gradient, written, or added to what ``dw`` holds (``accumulate``)."""
    from cvmm_kernel import moe_triton as kt
    from cvmm_kernel.moe_ops import _Rows

    g = torch.Generator().manual_seed(5)
    use, want = _pending(g, 4, 37, 2, 24, 20, True, True, True, "cpu")
    launch = dict(a_gather=True, b_gather=True, gate=use.gate, config=use.config, split=split)
    rows = _Rows(use.sorted_to_slot, use.offsets)
    dw = torch.full_like(use.like, float("nan"))
    kt.moe_weight_grad(use.a, use.b, dw, rows, use.top_k, **launch)
    assert rel_error(dw, want) < 1e-5
    before = torch.randn(dw.shape, generator=g)
    dw = before.clone()
    kt.moe_weight_grad(use.a, use.b, dw, rows, use.top_k, accumulate=True, **launch)
    assert rel_error(dw, want + before.double()) < 1e-5
