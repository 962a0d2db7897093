"""moe_linear against an independent float64 oracle: forward and every gradient, every backend."""

from __future__ import annotations

import contextlib

import pytest
import torch
from cvmm_kernel import moe_linear

from testing_support import (
    BACKENDS,
    DEVICES,
    TRITON_CUDA,
    TRITON_INTERPRET,
    TinyExpertProjections,
    assert_compiled_matches_eager,
    capture_cuda_graph,
    rel_error,
)

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}


def oracle(x, index, gate, weight, shared, reduce_groups):
    """float64, each slot's whole expert matrix gathered (no sorting, no kernels)."""
    x, gate, weight = (t.double() for t in (x, gate, weight))
    rows = x.unsqueeze(-2) if shared else x  # [..., G or 1, d_in]
    out = torch.einsum("...gi,...gkio,...gk->...go", rows, weight[index], gate)
    return out.sum(-2) if reduce_groups else out


def make_inputs(lead, groups, k, n_experts, d_in, d_out, *, shared, dtype, device, seed,
                experts_used=None):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, *(() if shared else (groups,)), d_in, generator=g)
    high = n_experts if experts_used is None else experts_used
    scores = torch.rand(*lead, groups, high, generator=g)
    index = scores.topk(min(k, high), dim=-1).indices  # distinct experts per group, as top-k
    if k > high:
        index = torch.zeros(*lead, groups, k, dtype=torch.long)
    gate = torch.rand(*lead, groups, k, generator=g)
    weight = torch.randn(n_experts, d_in, d_out, generator=g) / d_in**0.5
    return [
        t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        for t in (x, index, gate, weight)
    ]


def check(backend, inputs, dtype, *, shared, reduce_groups, deterministic=True):
    x, index, gate, weight = (t.detach() for t in inputs)
    leaves = [t.clone().requires_grad_() for t in (x, gate, weight)]
    out = moe_linear(
        leaves[0],
        index,
        leaves[1],
        leaves[2],
        reduce_groups=reduce_groups,
        deterministic=deterministic,
        backend=backend,
    )
    ref = [t.detach().cpu().double().requires_grad_() for t in (x, gate, weight)]
    expected = oracle(ref[0], index.cpu(), ref[1], ref[2], shared, reduce_groups)
    assert out.shape == expected.shape and out.dtype == dtype
    tol = TOLERANCE[dtype]
    if expected.numel():
        assert rel_error(out.cpu(), expected) < tol
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    out.backward(grad)
    expected.backward(grad.cpu().double())
    for name, mine, r in zip(("x", "gate", "weight"), leaves, ref):
        assert mine.grad is not None and mine.grad.shape == r.shape, name
        assert mine.grad.dtype == mine.dtype, name
        if r.grad.norm() > 0:
            assert rel_error(mine.grad.cpu(), r.grad) < 2 * tol, name
        else:
            assert torch.all(mine.grad == 0), name


@pytest.fixture(params=["pairs", "slots"])
def slot_sums(request, monkeypatch):
    """The Triton path's slot sums by pairs of experts where a group chose two (the default,
    ``cvmm_kernel.pair_slots``) or per slot."""
    from cvmm_kernel import pair_slots

    monkeypatch.setattr(pair_slots, "ENABLED", [request.param == "pairs"])
    return request.param


# (shared rows, reduce over groups): SwitchHead's value projection, its output projection, a
# plain MoE linear layer with rows per group, a shared row summed over everything.
LAYOUTS = [(True, False), (False, True), (False, False), (True, True)]


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize(
    ("shared", "reduce_groups", "k"),
    [(*layout, 2) for layout in LAYOUTS]
    + [(*layout, k) for layout in LAYOUTS[:2] for k in (1, 16)],
)
def test_matches_oracle(backend, device, shared, reduce_groups, k, slot_sums):
    # products narrower than the inputs (kept for the gate gradient) and wider (not kept)
    d_in, d_out = (24, 12) if shared else (12, 24)
    inputs = make_inputs((2, 3), 2, k, 20, d_in, d_out, shared=shared, dtype=torch.float32,
                         device=device, seed=k)  # fmt: skip
    check(backend, inputs, torch.float32, shared=shared, reduce_groups=reduce_groups)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize(
    ("case", "shared", "reduce_groups"),
    [("one-expert", True, False), ("idle-experts", False, True)]
    + [
        (case, *layout)
        for case in ("odd-rows", "atomic", "wide", "row-split", "wide-split")
        for layout in LAYOUTS[:2]
    ]
    + [("wide-both", *layout) for layout in LAYOUTS[:2]],
)
def test_edge_layouts(backend, device, shared, reduce_groups, case, monkeypatch, slot_sums):
    """One expert with every slot, experts with no slots, slot counts no tile size divides, the
    atomic sums, widths above the row-tile kernel's inner size (the general kernel) on either
    side or both, and the weight gradient's rows cut into ranges summed after the kernel: the
    sparse kernels' edge cases (the dense slot layouts, which these few experts would take, are
    off here; test_dense_layouts_match_oracle covers them)."""
    from cvmm_kernel import dense_slots, moe_triton

    monkeypatch.setattr(dense_slots, "MAX_RATIO", [0.0])

    if case in ("row-split", "wide-split"):
        monkeypatch.setattr(moe_triton, "row_split", lambda *sizes: 3)
    dtype = torch.float32
    sizes = dict(
        {"one-expert": ((37,), 2, 1, 6, 16, 16), "idle-experts": ((11,), 2, 2, 40, 16, 8)}
    ).get(case, ((23,), 3, 3, 5, 40, 18))
    if case in ("wide", "wide-split"):  # inner sizes above ROWS_MAX_K forward and backward
        sizes = ((5,), 2, 2, 3, 136, 20) if shared else ((5,), 2, 2, 3, 20, 136)
    if case == "wide-both":
        sizes = ((3,), 2, 2, 3, 136, 144)
    lead, groups, k, n_experts, d_in, d_out = sizes
    used = {"one-expert": 1, "idle-experts": 3}.get(case)
    inputs = make_inputs(lead, groups, k, n_experts, d_in, d_out, shared=shared, dtype=dtype,
                         device=device, seed=5, experts_used=used)  # fmt: skip
    check(backend, inputs, dtype, shared=shared, reduce_groups=reduce_groups,
          deterministic=case != "atomic")  # fmt: skip


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize(("shared", "reduce_groups"), LAYOUTS[:3])
@pytest.mark.parametrize("n_experts", [6, 50])  # pair numbers binned by histogram, or not
def test_pair_sums_edge_cases(backend, device, shared, reduce_groups, n_experts, monkeypatch):
    """Slot sums by pairs of experts: one pair in either order over several tiles of items,
    beside pairs of one item, and groups that chose one expert twice (``lo == hi``); with 50
    experts the 1275 pair numbers take the routing's path for many experts."""
    from cvmm_kernel import dense_slots

    monkeypatch.setattr(dense_slots, "MAX_RATIO", [0.0])
    d_in, d_out = (24, 12) if shared else (12, 24)
    inputs = make_inputs((41,), 3, 2, n_experts, d_in, d_out, shared=shared,
                         dtype=torch.float32, device=device, seed=3)  # fmt: skip
    index = inputs[1]
    index[:30, 0] = torch.tensor([1, 4])
    index[:15, 0] = torch.tensor([4, 1])
    index[30:33] = 2
    check(backend, inputs, torch.float32, shared=shared, reduce_groups=reduce_groups)


DENSE_CASES = [
    # (layout, groups, k, experts, d_in, d_out, the dense layout at MAX_RATIO 2)
    (LAYOUTS[0], 4, 2, 16, 24, 12, "input"),  # SwitchHead's value projection, 4 x 4
    (LAYOUTS[1], 4, 2, 16, 12, 24, "output"),  # its output projection
    (LAYOUTS[0], 4, 2, 32, 24, 12, None),  # 4 x 8: four times the FLOPs, sparse
    (LAYOUTS[2], 3, 2, 4, 20, 20, "input"),  # a plain MoE layer of 4 experts, top-2
    (LAYOUTS[3], 2, 3, 6, 8, 40, "output"),  # wider products: not kept, by output row
]


@pytest.mark.parametrize(("backend", "device"), [TRITON_INTERPRET, TRITON_CUDA])
@pytest.mark.parametrize("case", DENSE_CASES)
@pytest.mark.parametrize(("frozen", "deterministic"),
                         [(None, True), ("x", True), ("weight", True), (None, False)])  # fmt: skip
def test_dense_layouts_match_oracle(backend, device, case, frozen, deterministic, monkeypatch):
    """Few experts per slot: the dense matmuls over every expert (dense_slots) give the
    oracle's forward and gradients, the gate's included, in the layout their FLOPs pick, and
    the sparse kernels where the FLOPs are too many; with frozen inputs too, and in the atomic
    mode (which takes the same layouts)."""
    from cvmm_kernel import dense_slots

    (shared, reduce_groups), groups, k, n_experts, d_in, d_out, expected_side = case
    taken = []
    for name in ("input_rows_backward", "output_rows_forward", "output_rows_weight_grad"):
        original = getattr(dense_slots, name)
        monkeypatch.setattr(dense_slots, name, lambda *a, _f=original, _n=name, **kw: (
            taken.append(_n), _f(*a, **kw))[1])  # fmt: skip
    inputs = make_inputs((3, 7), groups, k, n_experts, d_in, d_out, shared=shared,
                         dtype=torch.float32, device=device, seed=n_experts + d_out)  # fmt: skip
    if frozen is None:
        check(backend, inputs, torch.float32, shared=shared, reduce_groups=reduce_groups,
              deterministic=deterministic)  # fmt: skip
    else:
        x, index, gate, weight = inputs
        leaves = [t.clone().requires_grad_(name != frozen) for name, t in
                  (("x", x), ("gate", gate), ("weight", weight))]  # fmt: skip
        out = moe_linear(leaves[0], index, leaves[1], leaves[2], reduce_groups=reduce_groups,
                         backend=backend)  # fmt: skip
        ref = [t.detach().double().cpu().requires_grad_() for t in (x, gate, weight)]
        expected = oracle(ref[0], index.cpu(), ref[1], ref[2], shared, reduce_groups)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        out.backward(grad.to(out))
        expected.backward(grad.double())
        for name, mine, r in zip(("x", "gate", "weight"), leaves, ref):
            if name == frozen:
                assert mine.grad is None, name
            else:
                assert rel_error(mine.grad.cpu(), r.grad) < 2 * TOLERANCE[torch.float32], name
    if expected_side == "input":
        assert set(taken) == {"input_rows_backward"}
    elif expected_side == "output":
        weight_grad = [] if frozen == "weight" else ["output_rows_weight_grad"]
        assert taken == ["output_rows_forward", *weight_grad]
    else:
        assert taken == []


@pytest.mark.parametrize(("backend", "device"), [TRITON_INTERPRET, TRITON_CUDA])
def test_dense_layouts_off_by_ratio(backend, device, monkeypatch):
    """MAX_RATIO 0 keeps every call on the sparse kernels, with the same results up to
    rounding."""
    from cvmm_kernel import dense_slots

    inputs = make_inputs((5, 6), 4, 2, 16, 24, 12, shared=True, dtype=torch.float32,
                         device=device, seed=2)  # fmt: skip
    results = []
    for ratio in (2.0, 0.0):
        monkeypatch.setattr(dense_slots, "MAX_RATIO", [ratio])
        x, index, gate, weight = (t.detach().clone() for t in inputs)
        leaves = [t.requires_grad_() for t in (x, gate, weight)]
        out = moe_linear(leaves[0], index, *leaves[1:], backend=backend)
        out.backward(torch.ones_like(out))
        results.append([out.detach()] + [t.grad for t in leaves])
    assert dense_slots.side(16, 8, 2, True) is None  # (the patched ratio)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("backend", "device"), [TRITON_INTERPRET, TRITON_CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_spread_kernel_matches_reference(backend, device, dtype):
    """The spread kernel against its reference, with an expert chosen twice in a row (the
    gated rows add) and expert blocks over several programs."""
    from cvmm_kernel import dense_slots, moe_triton

    g = torch.Generator().manual_seed(4)
    n_rows, div, src_div, n_experts, width = 9, 3, 2, 70, 20
    index = torch.randint(0, n_experts, (n_rows * div,), generator=g)
    index[4] = index[3]  # row 1 chooses one expert twice
    gate = torch.rand(n_rows * div, generator=g)
    src = torch.randn(n_rows * div // src_div + 1, width, generator=g)
    src, gate, index = src.to(device, dtype), gate.to(device), index.to(device)
    out = moe_triton.spread_slots(src, index, gate, n_experts, div, src_div)
    expected = dense_slots.reference_spread(src, index, gate, n_experts, div, src_div)
    assert out.shape == (n_rows, n_experts * width) and out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=1e-3 if dtype == torch.float16 else 1e-6,
                               atol=1e-3 if dtype == torch.float16 else 1e-6)  # fmt: skip
    chosen = out.view(n_rows, n_experts, width)[1, index[3]]
    row = src[4 // src_div].float() * gate[4] + src[3 // src_div].float() * gate[3]
    torch.testing.assert_close(chosen.float(), row, rtol=2e-3, atol=2e-3)


def test_dense_layout_choice():
    """The layout by FLOPs ratio: SwitchHead's 4 x 4 projections dense, 4 x 8 sparse."""
    from cvmm_kernel import dense_slots

    assert dense_slots.side(16, 8, 2, True) == "input"  # values: 16 experts, 8 slots a row
    assert dense_slots.side(16, 2, 8, False) == "output"  # output: 8 slots per token
    assert dense_slots.side(32, 8, 2, True) is None
    assert dense_slots.side(32, 2, 8, False) is None
    assert dense_slots.side(16, 2, 8, True) == "output"  # kept products, too few per input row


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize(
    ("shared", "reduce_groups", "frozen"),
    [(True, False, "x"), (False, True, "weight"), (True, False, "x-and-gate"),
     (False, True, "x-and-gate")],
)  # fmt: skip
def test_frozen_inputs(backend, device, shared, reduce_groups, frozen, monkeypatch):
    """Gradients only for the inputs that want one, equal to the full backward's; a frozen
    weight's gradient kernel does not run (on the sparse kernels; test_dense_layouts_match_oracle
    freezes inputs of the dense layouts)."""
    from cvmm_kernel import dense_slots
    from cvmm_kernel import moe_triton as kt

    monkeypatch.setattr(dense_slots, "MAX_RATIO", [0.0])

    d_in, d_out = (24, 12) if shared else (12, 24)
    inputs = make_inputs((9,), 2, 2, 6, d_in, d_out, shared=shared, dtype=torch.float32,
                         device=device, seed=15)  # fmt: skip
    x, index, gate, weight = inputs
    grad = torch.randn(*((9, d_out) if reduce_groups else (9, 2, d_out)), device=device)
    full = [t.clone().requires_grad_() for t in (x, gate, weight)]
    moe_linear(full[0], index, full[1], full[2], reduce_groups=reduce_groups,
               backend=backend).backward(grad)  # fmt: skip
    wgrad_launches = []
    launch_wgrad = kt.moe_weight_grad

    def counting(*args, **kwargs):
        wgrad_launches.append(1)
        return launch_wgrad(*args, **kwargs)

    monkeypatch.setattr(kt, "moe_weight_grad", counting)
    frozen_names = {"x-and-gate": ("x", "gate")}.get(frozen, (frozen,))
    leaves = [t.clone().requires_grad_(n not in frozen_names)
              for n, t in zip(("x", "gate", "weight"), (x, gate, weight))]  # fmt: skip
    moe_linear(leaves[0], index, leaves[1], leaves[2], reduce_groups=reduce_groups,
               backend=backend).backward(grad)  # fmt: skip
    for name, mine, ref in zip(("x", "gate", "weight"), leaves, full):
        if name in frozen_names:
            assert mine.grad is None, name
        else:
            torch.testing.assert_close(mine.grad, ref.grad, rtol=0, atol=0, msg=name)
    if backend == "triton":
        assert wgrad_launches == ([] if frozen == "weight" else [1])


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_float64_reference_is_exact(backend, device):
    if backend == "triton":
        pytest.skip("float64 goes to the reference")
    inputs = make_inputs((9,), 2, 3, 5, 8, 6, shared=True, dtype=torch.float64, device=device,
                         seed=1)  # fmt: skip
    check(backend, inputs, torch.float64, shared=True, reduce_groups=False)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize(("lead", "k", "d_in"), [((0,), 2, 8), ((4,), 0, 8), ((4,), 2, 0)])
def test_empty(backend, device, lead, k, d_in):
    """No tokens, no experts per group, or no input width: zeros, and zero gradients."""
    x, index, gate, weight = make_inputs(lead, 3, 2, 4, d_in, 6, shared=True,
                                         dtype=torch.float32, device=device, seed=6)  # fmt: skip
    index, gate = index[..., :k], gate[..., :k]
    leaves = [t.clone().requires_grad_() for t in (x, gate, weight)]
    out = moe_linear(leaves[0], index, leaves[1], leaves[2], backend=backend)
    assert out.shape == (*lead, 3, 6) and torch.all(out == 0)
    out.sum().backward()
    for t in leaves:
        assert t.grad is not None and torch.all(t.grad == 0)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize(("shared", "reduce_groups"), LAYOUTS[:2])
@pytest.mark.parametrize(("dense_slots", "deterministic"),
                         [(False, True), (True, True), (True, False), (False, False)])  # fmt: skip
def test_deterministic_is_bitwise_reproducible(
    backend, device, shared, reduce_groups, dense_slots, deterministic, monkeypatch
):
    """Two runs give the same bits, on the sparse kernels and on the dense slot layouts (9
    experts for 8 slots per row), which ``deterministic=False`` takes too, as it takes the
    sums by pairs of experts (two chosen per group)."""
    import cvmm_kernel.dense_slots

    monkeypatch.setattr(cvmm_kernel.dense_slots, "MAX_RATIO", [2.0 if dense_slots else 0.0])
    inputs = make_inputs((50,), 4, 2, 9, 32, 16, shared=shared, dtype=torch.float32,
                         device=device, seed=9)  # fmt: skip
    results = []
    for _ in range(2):
        x, index, gate, weight = (t.detach().clone() for t in inputs)
        leaves = [t.requires_grad_() for t in (x, gate, weight)]
        out = moe_linear(leaves[0], index, *leaves[1:], reduce_groups=reduce_groups,
                         deterministic=deterministic, backend=backend)  # fmt: skip
        out.backward(torch.ones_like(out))
        results.append([out.detach()] + [t.grad for t in leaves])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize(("shared", "reduce_groups"), LAYOUTS[:2])
@pytest.mark.parametrize("n_experts", [32, 16])
def test_cuda_bf16_autocast(deterministic, shared, reduce_groups, n_experts):
    """bf16 under autocast, fp32 master weight: bf16 output, fp32 gradients, within the error
    of the same computation in plain PyTorch under autocast (with a margin); 32 experts (8 per
    group) on the sparse kernels, 16 (4 per group, 2 chosen) on the dense slot layouts."""
    inputs = make_inputs((4, 256), 4, 2, n_experts, 256, 128, shared=shared,
                         dtype=torch.float32, device="cuda", seed=10)  # fmt: skip
    x, index, gate, weight = inputs
    leaves = [t.clone().requires_grad_() for t in (x, gate, weight)]
    plain = [t.clone().requires_grad_() for t in (x, gate, weight)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = moe_linear(leaves[0], index, *leaves[1:], reduce_groups=reduce_groups,
                         deterministic=deterministic, index_bound=n_experts)  # fmt: skip
        rows = plain[0].unsqueeze(-2) if shared else plain[0]
        plain_out = torch.einsum("...gi,...gkio,...gk->...go", rows, plain[2][index], plain[1])
        plain_out = plain_out.sum(-2) if reduce_groups else plain_out
    assert out.dtype == torch.bfloat16
    ref = [t.detach().double().requires_grad_() for t in (x, gate, weight)]
    expected = oracle(ref[0], index, ref[1], ref[2], shared, reduce_groups)
    assert rel_error(out, expected) < 1.5 * rel_error(plain_out, expected) + 1e-3
    grad = torch.randn_like(out)
    for t in (out, plain_out, expected):
        t.backward(grad.to(t.dtype))
    for name, mine, other, r in zip(("x", "gate", "weight"), leaves, plain, ref):
        assert mine.grad.dtype == torch.float32, name
        assert rel_error(mine.grad, r.grad) < 1.5 * rel_error(other.grad, r.grad) + 1e-3, name


@pytest.mark.gpu
@pytest.mark.parametrize(("shared", "reduce_groups"), LAYOUTS[:2])
def test_cuda_float32_at_tuned_sizes(shared, reduce_groups, monkeypatch):
    """float32 at SwitchHead's sizes (1024-wide rows, 128-wide heads), where the bf16-tuned
    launch settings would overflow shared memory (the sparse kernels': the dense slot layouts
    that 4 x 4 experts take are off)."""
    from cvmm_kernel import dense_slots

    monkeypatch.setattr(dense_slots, "MAX_RATIO", [0.0])
    d_in, d_out = (1024, 128) if shared else (128, 1024)
    inputs = make_inputs((64,), 4, 2, 16, d_in, d_out, shared=shared, dtype=torch.float32,
                         device="cuda", seed=14)  # fmt: skip
    for deterministic in (True, False):
        check("triton", inputs, torch.float32, shared=shared, reduce_groups=reduce_groups,
              deterministic=deterministic)  # fmt: skip


@pytest.mark.gpu
def test_cuda_graph_capture_forward_backward():
    """A whole forward + backward of both projections replays from a CUDA graph."""
    x, index, gate, w_v = make_inputs((512,), 4, 2, 16, 128, 32, shared=True,
                                      dtype=torch.bfloat16, device="cuda", seed=11)  # fmt: skip
    w_o = torch.randn(16, 32, 128, device="cuda", dtype=torch.bfloat16) / 6
    leaves = [t.clone().requires_grad_() for t in (x, gate, w_v, w_o)]

    def step():
        v = moe_linear(leaves[0], index, leaves[1], leaves[2], index_bound=16)
        out = moe_linear(v, index, leaves[1], leaves[3], reduce_groups=True, index_bound=16)
        out.backward(torch.ones_like(out))
        return out

    graph, out = capture_cuda_graph(step, leaves)
    index.copy_(index.roll(1, 0))  # new routing, same buffers: the replay must follow it
    graph.replay()
    torch.cuda.synchronize()
    ref = [t.detach().double() for t in (x, gate, w_v, w_o)]
    v = oracle(ref[0], index, ref[1], ref[2], True, False)
    expected = oracle(v, index, ref[1], ref[3], False, True)
    assert rel_error(out, expected) < 2e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_experts", [3, 8])
def test_compile_fullgraph_matches_eager(device, n_experts):
    """torch.compile(fullgraph=True) sees the custom ops (no graph break); same outputs/grads.
    3 experts per head take the dense slot layouts on CUDA, 8 the sparse kernels."""
    torch.manual_seed(0)
    model = TinyExpertProjections(n_experts=n_experts).to(device)
    x = torch.randn(3, 5, 16, device=device)
    assert_compiled_matches_eager(model, x, loss=lambda out: out.square().sum())


def _good(**over):
    x, index, gate, weight = make_inputs((4,), 3, 2, 5, 8, 6, shared=True, dtype=torch.float32,
                                         device="cpu", seed=12)  # fmt: skip
    args = dict(x=x, index=index, gate=gate, weight=weight)
    args.update(over)
    return args


def _uses_grads(backend, device, compute_dtype_grads, uses=(0, 1), *, compiled=False):
    """An fp32 weight applied (SwitchHead's value form) to the inputs ``uses`` of a batch under
    autocast (fp16 in the interpreter, bf16 elsewhere): its gradient."""
    x, index, gate, weight = make_inputs(
        (2, 12), 3, 2, 6, 32, 16, shared=True, dtype=torch.float32, device=device, seed=5
    )
    weight.requires_grad_()
    compute = torch.float16 if backend == "triton" and device == "cpu" else torch.bfloat16

    def loss(rows):
        total = 0
        for i in uses:
            with torch.autocast(device, dtype=compute):
                out = moe_linear(rows[i], index[i], gate[i], weight, backend=backend,
                                 weight_grads_in_compute_dtype=compute_dtype_grads)  # fmt: skip
            total = total + out.float().square().sum()
        return total

    (torch.compile(loss, fullgraph=True) if compiled else loss)(x).backward()
    return weight.grad, compute


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_weight_grads_in_compute_dtype_round_each_use(backend, device):
    """Each use's weight gradient rounded to the compute dtype, summed in fp32."""
    per_use = [_uses_grads(backend, device, False, (i,))[0] for i in (0, 1)]
    got, compute = _uses_grads(backend, device, True)
    want = sum(g.to(compute).float() for g in per_use)
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.gpu
def test_weight_grads_in_compute_dtype_compiled():
    """Compiled, the graph sums the per-use gradients as eager does: rounded, or (this shape
    takes a dense slot layout, its weight gradient a PyTorch matmul whose rounding Inductor
    fuses into the sum and leaves out) not rounded; either to float32 rounding."""
    got = _uses_grads("triton", "cuda", True, compiled=True)[0]
    rounded = _uses_grads("triton", "cuda", True)[0]
    unrounded = _uses_grads("triton", "cuda", False)[0]
    assert got.dtype == torch.float32
    assert min(rel_error(got, rounded), rel_error(got, unrounded)) < 1e-5


@pytest.mark.parametrize(
    ("over", "error", "match"),
    [
        (dict(x=torch.randn(5, 8)), ValueError, r"x must be \[\.\.\., G, d_in\]"),
        (dict(x=torch.randn(4, 2, 8)), ValueError, r"x must be \[\.\.\., G, d_in\]"),
        (dict(index=torch.zeros(4, 3, 2)), TypeError, "integer tensor"),
        (dict(gate=torch.rand(4, 3, 3)), ValueError, "gate must have index's shape"),
        (dict(gate=torch.ones(4, 3, 2, dtype=torch.long)), TypeError, "floating point"),
        (dict(weight=torch.randn(5, 8)), ValueError, r"weight must be \[E, d_in, d_out\]"),
        (dict(x=torch.randn(4, 7)), ValueError, "width 7"),
        (dict(index=torch.full((4, 3, 2), 5)), ValueError, r"in \[0, 5\)"),
        (dict(index=torch.full((4, 3, 2), -1)), ValueError, r"in \[0, 5\)"),
        (dict(x=torch.randn(4, 8, dtype=torch.float64)), TypeError, "share a dtype"),
        (dict(x=torch.randn(4, 8, device="meta")), ValueError, "one device|meta"),
        (dict(index_bound=6), ValueError, "exceeds the number of experts"),
        (
            dict(x=torch.randn(4, 3, 2, 8), index=torch.zeros(4, 3, 2, dtype=torch.long)),
            ValueError,
            r"x must be",
        ),
    ],
)
def test_bad_inputs_raise_before_any_kernel(over, error, match):
    with pytest.raises(error, match=match):
        moe_linear(**_good(**over))


def test_reduce_groups_needs_a_group_dimension():
    with pytest.raises(ValueError, match="reduce_groups needs"):
        moe_linear(torch.randn(8), torch.zeros(2, dtype=torch.long), torch.rand(2),
                   torch.randn(3, 8, 4), reduce_groups=True)  # fmt: skip


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_second_derivatives_raise_on_the_triton_path(backend, device):
    """The Triton backward records no graph, so ``create_graph=True`` raises there instead of
    giving a wrong second derivative; the reference path's backward is differentiable."""
    from cvmm_kernel import moe_mlp, sigmoid_topk

    x, index, gate, weight = make_inputs(
        (5,), 2, 2, 4, 8, 6, shared=False, dtype=torch.float32, device=device, seed=30
    )
    x.requires_grad_()
    w_down = weight.transpose(1, 2)
    calls = {
        "moe_linear": lambda: moe_linear(x, index, gate, weight, backend=backend),
        "moe_mlp": lambda: moe_mlp(x, index, gate, weight, w_down, "relu", backend=backend),
    }
    if backend == "triton":  # sigmoid_topk's Triton path (its reference is PyTorch ops)
        calls["sigmoid_topk"] = lambda: sigmoid_topk(x, 2, backend=backend)[1]
    for name, call in calls.items():
        if backend == "triton":  # raised by the first backward or by the second
            with pytest.raises(RuntimeError):
                (dx,) = torch.autograd.grad(call().square().sum(), x, create_graph=True)
                torch.autograd.grad(dx.sum(), x)
        else:
            (dx,) = torch.autograd.grad(call().square().sum(), x, create_graph=True)
            assert torch.autograd.grad(dx.sum(), x)[0].shape == x.shape, name


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("n_experts", [32, 96])  # by pairs (8 per group), per slot (24)
def test_cuda_backward_overlap_same_bits(n_experts, graph, monkeypatch):
    """O's backward with the input gradient on a side stream (``linear_overlap``, eagerly with
    ``eager_overlap``): the same bits as in order, eager and replayed from a CUDA graph."""
    from cvmm_kernel import moe_ops

    x, index, gate, weight = make_inputs((512,), 4, 2, n_experts, 128, 256, shared=False,
                                         dtype=torch.bfloat16, device="cuda", seed=16)  # fmt: skip
    grad = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    results = []
    for overlap in (False, True):
        monkeypatch.setitem(moe_ops.BACKWARD_SCHEDULE, "linear_overlap", overlap)
        monkeypatch.setitem(moe_ops.BACKWARD_SCHEDULE, "eager_overlap", overlap)
        leaves = [t.clone().requires_grad_() for t in (x, gate, weight)]

        def step(leaves=leaves):
            for t in leaves:
                t.grad = None
            moe_linear(leaves[0], index, leaves[1], leaves[2], reduce_groups=True,
                       index_bound=n_experts).backward(grad)  # fmt: skip

        step()
        if graph:
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step()
            for t in leaves:  # poison, then replay
                t.grad.fill_(float("nan"))
            g.replay()
        torch.cuda.synchronize()
        results.append([t.grad.clone() for t in leaves])
    for name, a, b in zip(("x", "gate", "weight"), *results):
        assert torch.equal(a, b), name


@pytest.mark.gpu
def test_cuda_side_stream_only_in_capture(monkeypatch):
    """By default the backward's side stream is taken only while a CUDA graph is captured:
    eagerly its waits and events would cost host time at every call."""
    from cvmm_kernel import moe_ops

    device = torch.device("cuda")
    context, _join = moe_ops.side_work(device, True)
    assert isinstance(context, contextlib.nullcontext)
    monkeypatch.setitem(moe_ops.BACKWARD_SCHEDULE, "eager_overlap", True)
    context, join = moe_ops.side_work(device, True)
    assert isinstance(context, torch.cuda.StreamContext)
    join()
    monkeypatch.setitem(moe_ops.BACKWARD_SCHEDULE, "eager_overlap", False)
    torch.cuda.synchronize()
    graph, kinds = torch.cuda.CUDAGraph(), []
    with torch.cuda.graph(graph):
        context, join = moe_ops.side_work(device, True)
        kinds.append(type(context))
        join()
    assert kinds == [torch.cuda.StreamContext]
    assert isinstance(moe_ops.side_work(device, False)[0], contextlib.nullcontext)


def test_pair_choice_traces_in_a_compiled_graph():
    """``pair_slots.wanted`` runs inside ``moe_linear``'s traced Python under ``torch.compile``:
    it must not call what Dynamo cannot trace (``importlib``), also where Triton's pairs apply."""
    from cvmm_kernel import pair_slots

    @torch.compile(fullgraph=True, backend="eager")
    def choose(x):
        return x + pair_slots.wanted(32, 2, 4096, "triton", (False, None))

    assert choose(torch.zeros(1)).item() in (0.0, 1.0)
