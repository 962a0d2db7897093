"""expert_mix: mix_experts / spread_experts on every backend against a float64 oracle written out
with one-hot sums (forward, the values'/input's gradient and the gate's), on the strided views
the layer hands them, with repeated experts and row counts that are no multiple of the block."""

from __future__ import annotations

import pytest
import torch
from switchhead.expert_mix import mix_experts, spread_experts

from testing_support import BACKENDS, assert_rel_close, tolerance


def oracle_mix(values, index, gate):
    onehot = torch.nn.functional.one_hot(index, values.shape[-2]).double()  # [..., k, E]
    return torch.einsum("...ke,...k,...ec->...c", onehot, gate.double(), values.double())


def oracle_spread(x, index, gate, n_experts):
    onehot = torch.nn.functional.one_hot(index, n_experts).double()
    return torch.einsum("...ke,...k,...c->...ec", onehot, gate.double(), x.double())


def _choice(lead, n_experts, k, device, g, repeat=False, dtype=torch.float32):
    if repeat:  # the same expert in several slots
        index = torch.randint(0, n_experts, (*lead, k), generator=g)
    else:
        index = torch.rand(*lead, n_experts, generator=g).argsort(-1)[..., :k]
    gate = torch.rand(*lead, k, generator=g, dtype=torch.float64)
    return index.to(device), gate.to(device, dtype).requires_grad_()


def _fused_values(lead, n_experts, width, dtype, device, g):
    """``[..., E, C]`` as the layer sees it: a column slice of a wider projection output."""
    full = torch.randn(*lead[:-1], lead[-1] * n_experts * width + 7, generator=g)
    full = full.to(device, dtype)
    values = full[..., 3 : 3 + lead[-1] * n_experts * width].view(*lead, n_experts, width)
    return values.detach().requires_grad_()


CASES = [  # leading dims, experts, k, channels, repeated experts
    ((2, 37, 3), 4, 2, 20, False),  # [B, T, H], rows no multiple of the block
    ((5, 4), 6, 1, 16, False),
    ((3, 2, 5, 2), 4, 4, 12, False),  # four leading dims; every expert chosen
    ((70,), 5, 3, 24, True),  # one leading dim; repeated experts sum their gates
]


def _grads(out, inputs, seed):
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return grad, torch.autograd.grad(out, inputs, grad)


def _assert_matches_oracle(out, inputs, oracle, names, seed, dtype):
    """``out`` of ``inputs`` (rows, gate) and both gradients against ``oracle`` on float64 CPU
    copies of the inputs, within the dtype's tolerance."""
    grad, grads = _grads(out, inputs, seed)
    ref_in = [t.detach().cpu().double().requires_grad_() for t in inputs]
    ref = oracle(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.cpu().double())
    tol = tolerance(dtype)
    for name, mine, want in zip(("out", *names), (out, *grads), (ref, *ref_grads)):
        assert_rel_close(mine.cpu(), want, tol, msg=name)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_mix_matches_oracle(backend, device, case):
    lead, n_experts, k, width, repeat = case
    g = torch.Generator().manual_seed(0)
    dtype = torch.float64 if backend == "reference" else torch.float32
    values = _fused_values(lead, n_experts, width, dtype, device, g)
    index, gate = _choice(lead, n_experts, k, device, g, repeat, dtype)
    out = mix_experts(values, index, gate, backend=backend)
    assert out.dtype == dtype and out.shape == (*lead, width)
    oracle = lambda v, gt: oracle_mix(v, index.cpu(), gt)
    _assert_matches_oracle(out, (values, gate), oracle, ("dvalues", "dgate"), 1, dtype)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_spread_matches_oracle(backend, device, case):
    lead, n_experts, k, width, repeat = case
    g = torch.Generator().manual_seed(1)
    dtype = torch.float64 if backend == "reference" else torch.float32
    # an attention output [B, H, T, C] seen as [B, T, H, C] (a transposed view) where it has 3 dims
    shape = (lead[0], lead[2], lead[1], width) if len(lead) == 3 else (*lead, width)
    x = torch.randn(shape, generator=g).to(device, dtype)
    x = (x.transpose(1, 2) if len(lead) == 3 else x).requires_grad_()
    index, gate = _choice(lead, n_experts, k, device, g, repeat, dtype)
    out = spread_experts(x, index, gate, n_experts, backend=backend)
    assert out.dtype == dtype and out.shape == (*lead, n_experts, width)
    oracle = lambda xx, gt: oracle_spread(xx, index.cpu(), gt, n_experts)
    _assert_matches_oracle(out, (x, gate), oracle, ("dx", "dgate"), 2, dtype)


@pytest.mark.gpu
def test_bfloat16_values_with_float32_gates():
    """The layer's dtypes under autocast: bf16 values and inputs, float32 gates (whose gradient
    stays float32); errors within the bf16 matmul tolerance."""
    g = torch.Generator().manual_seed(3)
    values = _fused_values((4, 300, 4), 8, 104, torch.bfloat16, "cuda", g)
    index, gate = _choice((4, 300, 4), 8, 2, "cuda", g)
    out = mix_experts(values, index, gate)
    spread = spread_experts(out, index, gate, 8)
    assert out.dtype == spread.dtype == torch.bfloat16
    grad, (dvalues, dgate) = _grads(spread, (values, gate), 4)
    assert dgate.dtype == torch.float32
    ref_in = [t.detach().double().requires_grad_() for t in (values, gate)]
    ref = oracle_spread(oracle_mix(ref_in[0], index, ref_in[1]), index, ref_in[1], 8)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
    tol = tolerance(torch.bfloat16)
    assert_rel_close(spread.double(), ref, tol, msg="out")
    for name, mine, want in zip(("dvalues", "dgate"), (dvalues, dgate), ref_grads):
        assert_rel_close(mine.double(), want, tol, msg=name)


def test_gate_gradient_only_where_asked():
    """No gate gradient is computed (or returned) for a gate that does not need one."""
    g = torch.Generator().manual_seed(5)
    values = _fused_values((3, 4), 4, 8, torch.float64, "cpu", g)
    index, gate = _choice((3, 4), 4, 2, "cpu", g)
    out = mix_experts(values, index, gate.detach())
    (dvalues,) = torch.autograd.grad(out.sum(), (values,))
    assert dvalues.shape == values.shape


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda v, i, g: mix_experts(v, i.float(), g), TypeError, "index must be"),
        (lambda v, i, g: mix_experts(v, i, g[..., :1]), ValueError, "index and gate"),
        (lambda v, i, g: mix_experts(v[:2], i, g), ValueError, "leading dims"),
        (lambda v, i, g: spread_experts(v[..., 0, :], i, g.long(), 4), TypeError, "gate float"),
        (lambda v, i, g: mix_experts(v, i, g, backend="cuda"), ValueError, "backend must be"),
    ],
)
def test_bad_inputs_raise(call, error, match):
    values = torch.randn(3, 4, 4, 8)
    index = torch.zeros(3, 4, 2, dtype=torch.long)
    gate = torch.rand(3, 4, 2)
    with pytest.raises(error, match=match):
        call(values, index, gate)


def test_triton_backend_off_cuda_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    values = torch.randn(3, 4, 8)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        mix_experts(values, torch.zeros(3, 1, dtype=torch.long), torch.rand(3, 1), backend="triton")


@pytest.mark.parametrize(("backend", "device"), [b for b in BACKENDS if b.values[0] == "triton"])
def test_second_derivatives_raise_on_the_triton_path(backend, device):
    """The kernels' backward records no graph: ``create_graph=True`` raises instead of giving a
    wrong second derivative (mixing, spreading and the RoPE rotation)."""
    from switchhead import RotaryEmbedding

    g = torch.Generator().manual_seed(3)
    values = torch.randn(4, 3, 5, 8, generator=g).to(device).requires_grad_()
    index = torch.randint(0, 5, (4, 3, 2), generator=g).to(device)
    gate = torch.rand(4, 3, 2, generator=g).to(device)
    rope = RotaryEmbedding(8, head_size=8, backend=backend).to(device)
    calls = {
        "mix": lambda: mix_experts(values, index, gate, backend=backend),
        "spread": lambda: spread_experts(values[..., 0, :], index, gate, 5, backend=backend),
        "rope": lambda: rope(values, seq_dim=1),
    }
    for call in calls.values():
        (dx,) = torch.autograd.grad(call().square().sum(), values, create_graph=True)
        with pytest.raises(RuntimeError):
            torch.autograd.grad(dx.sum(), values)
