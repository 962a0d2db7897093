"""cvmm against an independent float64 oracle: every backend, forward and gradients."""

from __future__ import annotations

import pytest
import torch
from cvmm_kernel import cvmm, cvmm_prepare_sel, cvmm_prepare_sel2, cvmm_reference
from hypothesis import given, settings
from hypothesis import strategies as st

from testing_support import BACKENDS_WITH_CUDA_REFERENCE as BACKENDS
from testing_support import rel_error

# Relative tolerance of each dtype against the float64 oracle (rounding of inputs and output).
# Looser than testing_support.TOLERANCES (DESIGN.md) for every dtype; kept until a GPU run shows
# the Triton paths within the table.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def run_case(problem, backend, oracle, dtype):
    """Forward and gradients of cvmm vs the oracle; returns nothing, asserts."""
    x = problem.x.detach().requires_grad_()
    w = problem.weights.detach().requires_grad_()
    red = None if problem.reduction is None else problem.reduction.detach().requires_grad_()
    sel = cvmm_prepare_sel2(problem.sel, red)
    out = cvmm(x, sel, w, backend=backend)
    expected = oracle(
        x.detach(), w.detach(), problem.sel.cpu(), None if red is None else red.detach()
    )
    expected = expected.to(out.device)
    assert out.shape == expected.shape
    assert out.dtype == dtype
    tol = TOLERANCE[dtype]
    if out.numel():
        assert rel_error(out, expected) < tol
    grad = torch.randn_like(out)
    torch.autograd.backward(out, grad)
    x64 = problem.x.detach().double().requires_grad_()
    w64 = problem.weights.detach().double().requires_grad_()
    r64 = None if red is None else red.detach().double().requires_grad_()
    torch.autograd.backward(oracle(x64, w64, problem.sel, r64), grad.double())
    for mine, ref in [(x.grad, x64.grad), (w.grad, w64.grad)] + (
        [(red.grad, r64.grad)] if red is not None else []
    ):
        assert mine is not None and mine.shape == ref.shape
        if ref.numel() and ref.norm() > 0:
            assert rel_error(mine, ref) < tol * 2
        else:
            assert torch.all(mine == 0)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 16])
@pytest.mark.parametrize("reduce", [False, True])
def test_matches_oracle_fp32(backend, device, k, reduce, make_problem, oracle, generator):
    problem = make_problem((3, 7), k, 5, 24, 20, reduce=reduce, device=device, generator=generator)
    run_case(problem, backend, oracle, torch.float32)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_oracle_half(backend, device, dtype, make_problem, oracle, generator):
    if device == "cpu" and backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16 dot")
    problem = make_problem(
        (33,), 2, 6, 40, 24, reduce=True, dtype=dtype, device=device, generator=generator
    )
    run_case(problem, backend, oracle, dtype)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize(
    ("case", "n_experts", "experts_used"),
    [("one expert", 1, None), ("most experts get no rows", 9, 2), ("all rows on expert 0", 4, 1)],
)
def test_expert_edge_cases(
    backend, device, case, n_experts, experts_used, make_problem, oracle, generator
):
    problem = make_problem(
        (2, 9),
        2,
        n_experts,
        17,
        19,
        reduce=False,
        device=device,
        generator=generator,
        experts_used=experts_used,
    )
    run_case(problem, backend, oracle, torch.float32)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_more_rows_than_any_block(backend, device, make_problem, oracle, generator):
    problem = make_problem((131,), 3, 3, 70, 37, reduce=True, device=device, generator=generator)
    run_case(problem, backend, oracle, torch.float32)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_empty_input(backend, device, make_problem, oracle, generator):
    problem = make_problem((0,), 2, 3, 8, 5, reduce=True, device=device, generator=generator)
    run_case(problem, backend, oracle, torch.float32)
    problem = make_problem((0, 4), 2, 3, 8, 5, reduce=False, device=device, generator=generator)
    run_case(problem, backend, oracle, torch.float32)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_one_expert_per_row_with_raw_indices(backend, device, oracle, generator):
    x = torch.randn(4, 6, 10, generator=generator).to(device)
    w = torch.randn(5, 10, 3, generator=generator).to(device)
    sel = torch.randint(0, 5, (4, 6), generator=generator).to(device)
    out = cvmm(x, sel, w, backend=backend)
    expected = oracle(x.cpu(), w.cpu(), sel.cpu().unsqueeze(-1)).squeeze(-2)
    assert out.shape == (4, 6, 3)
    assert rel_error(out.cpu(), expected) < TOLERANCE[torch.float32]
    assert torch.equal(cvmm(x, cvmm_prepare_sel(sel), w, backend=backend), out)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_switchhead_output_projection_layout(backend, device, generator):
    """Per-head rows: sel_index = out_index // k and the reduction over heads and k at once."""
    batch, heads, k, n_experts, d_head, d_model = 5, 3, 2, 4, 6, 7
    rows = torch.randn(batch, heads, d_head, generator=generator).to(device)
    w = torch.randn(heads * n_experts, d_head, d_model, generator=generator).to(device)
    expert = torch.randint(0, n_experts, (batch, heads, k), generator=generator)
    expert = (expert + torch.arange(heads).view(1, heads, 1) * n_experts).to(device)
    gate = torch.rand(batch, heads, k, generator=generator).to(device)
    sel = cvmm_prepare_sel2(expert.flatten(-2, -1), gate)
    sel.sel_index = sel.out_index // k
    sel.reduction_weight = gate.flatten(-2)
    out = cvmm(rows, sel, w, backend=backend)
    expected = torch.einsum("bhk,bhd,bhkde->be", gate, rows, w[expert])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_non_contiguous_inputs(backend, device, generator):
    x = torch.randn(10, 12, generator=generator).to(device).t()  # [12, 10], strided
    w = torch.randn(4, 7, 10, generator=generator).to(device).transpose(1, 2)  # [4, 10, 7]
    sel = torch.randint(0, 4, (12, 2), generator=generator).to(device)
    out = cvmm(x, cvmm_prepare_sel2(sel), w, backend=backend)
    expected = torch.einsum("nd,nkde->nke", x, w[sel])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_deterministic(backend, device, make_problem, generator):
    problem = make_problem((50,), 4, 3, 16, 8, reduce=True, device=device, generator=generator)
    results = []
    for _ in range(2):
        w = problem.weights.detach().requires_grad_()
        out = cvmm(problem.x, cvmm_prepare_sel2(problem.sel, problem.reduction), w, backend=backend)
        out.sum().backward()
        results.append((out.detach(), w.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_gradcheck_float64(generator):
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    w = torch.randn(3, 5, 2, dtype=torch.float64, generator=generator, requires_grad=True)
    red = torch.rand(4, 3, 2, dtype=torch.float64, generator=generator, requires_grad=True)
    sel = torch.randint(0, 3, (4, 3, 2), generator=generator)
    assert torch.autograd.gradcheck(
        lambda x, w, r: cvmm(x, cvmm_prepare_sel2(sel, r), w), (x, w, red)
    )
    assert torch.autograd.gradcheck(
        lambda x, w, r: cvmm_reference(x, cvmm_prepare_sel2(sel, r), w), (x, w, red)
    )


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(0, 40),
    k=st.integers(1, 5),
    n_experts=st.integers(1, 9),
    d_in=st.integers(1, 33),
    d_out=st.integers(1, 33),
    reduce=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_reference_fuzzed_shapes(batch, k, n_experts, d_in, d_out, reduce, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d_in, dtype=torch.float64, generator=g)
    w = torch.randn(n_experts, d_in, d_out, dtype=torch.float64, generator=g)
    sel = torch.randint(0, n_experts, (batch, k), generator=g)
    red = torch.rand(batch, k, dtype=torch.float64, generator=g) if reduce else None
    out = cvmm(x, cvmm_prepare_sel2(sel, red), w)
    per_sel = torch.einsum("nd,nkde->nke", x, w[sel])
    expected = per_sel if red is None else torch.einsum("nk,nke->ne", red, per_sel)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(cvmm_reference(x, cvmm_prepare_sel2(sel, red), w), expected)


@pytest.mark.interpret
@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(1, 40),
    k=st.integers(1, 4),
    n_experts=st.integers(1, 6),
    d_in=st.integers(1, 40),
    d_out=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_triton_interpreter_fuzzed_shapes(batch, k, n_experts, d_in, d_out, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d_in, generator=g, requires_grad=True)
    w = torch.randn(n_experts, d_in, d_out, generator=g, requires_grad=True)
    sel = torch.randint(0, n_experts, (batch, k), generator=g)
    out = cvmm(x, cvmm_prepare_sel2(sel), w, backend="triton")
    ref = cvmm_reference(x, cvmm_prepare_sel2(sel), w)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), grad)
    rx, rw = torch.autograd.grad(ref, (x, w), grad)
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("known_layout", [True, False])
@pytest.mark.parametrize(("d_in", "d_out"), [(4, 5), (5, 4)])  # fused-reduce and bmm paths
def test_reduction_over_heads_gradcheck(known_layout, d_in, d_out):
    """SwitchHead's V layout: k experts per head and H heads per row (layout group H*k differs
    from the reduction's k); also the general path once the layout is no longer known."""
    g = torch.Generator().manual_seed(3)
    rows, heads, k, n_experts = 3, 2, 2, 3
    x = torch.randn(rows, d_in, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(heads * n_experts, d_in, d_out, dtype=torch.float64, generator=g)
    w.requires_grad_()
    idx = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(rows * heads)])
    idx = idx.view(rows, heads, k) + (torch.arange(heads) * n_experts).view(1, heads, 1)
    gate = torch.rand(rows, heads, k, dtype=torch.float64, generator=g, requires_grad=True)

    def run(x, w, gate):
        sel = cvmm_prepare_sel2(idx.flatten(-2), gate)
        if not known_layout:
            sel.sel_index = sel.sel_index.clone()
            assert sel.layout_group == 0
        return cvmm(x, sel, w)

    expected = torch.einsum("rd,rhkdo,rhk->rho", x, w[idx], gate)
    out = run(x, w, gate)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=g)
    got = torch.autograd.grad(out, (x, w, gate), grad)
    want = torch.autograd.grad(expected, (x, w, gate), grad)
    for a, b in zip(got, want):  # float64 all the way: agreement to rounding
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(run, (x, w, gate))
