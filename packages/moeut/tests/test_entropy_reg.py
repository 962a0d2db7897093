"""entropy_reg from one kernel pass each way (interpreter, GPU) against a float64 oracle written
out: value and gradient, several layouts of the averaged dim, deterministic, no NaN where the
plain expression has none."""

from __future__ import annotations

import math

import pytest
import torch
from moeut import entropy_reg, entropy_triton

from testing_support import assert_rel_close

# (device, dtype) of the logits: the interpreter takes 16/32-bit floats but not bfloat16
DEVICES = [
    pytest.param("cpu", torch.float32, marks=pytest.mark.interpret, id="interpret-fp32"),
    pytest.param("cpu", torch.float16, marks=pytest.mark.interpret, id="interpret-fp16"),
    pytest.param("cuda", torch.float32, marks=pytest.mark.gpu, id="cuda-fp32"),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu, id="cuda-bf16"),
]

# (shape, dim): MoEUT's feedforward [B, T * repeats, E] over -2 and attention [B, T * repeats,
# H, E] over -3; rows past one program's (LAUNCH["rows"]), a single row, the first dim, and
# dims after the averaged one that merge
SHAPES = [
    ((2, 37, 387), -2),
    ((3, 50, 4, 10), -3),
    ((2, 600, 7), 1),
    ((1, 1, 5), -2),
    ((700, 3), 0),
    ((2, 5, 2, 3, 9), 1),
]


def oracle(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """``mean over the other dims of sum_e m log m``, ``m`` the mean softmax over ``dim``, in
    float64."""
    p = torch.softmax(logits.double(), dim=-1)
    m = p.mean(dim)
    return (m * m.log()).sum(-1).mean()


def _logits(shape, device, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_()


@pytest.mark.parametrize(("device", "dtype"), DEVICES)
@pytest.mark.parametrize(("shape", "dim"), SHAPES)
def test_value_and_gradient_match_the_oracle(device, dtype, shape, dim):
    logits = _logits(shape, device, dtype, seed=len(shape) * 100 + shape[-1])
    value = entropy_reg(logits, dim)
    assert value.grad_fn is not None and "Fused" in type(value.grad_fn).__name__
    assert value.dtype == torch.float32 and value.shape == ()
    grad = torch.tensor(0.7, device=device)
    (dx,) = torch.autograd.grad(value, logits, grad)

    exact = logits.detach().double().requires_grad_()
    expected = oracle(exact, dim)
    (dx_exact,) = torch.autograd.grad(expected, exact, grad.double())
    # float32 sums of float32 softmaxes (inputs exact in any dtype, upcast)
    assert_rel_close(value.double(), expected, 1e-5)
    assert dx.dtype == logits.dtype and dx.shape == logits.shape
    tolerance = 2e-5 if dtype == torch.float32 else 1e-2  # the gradient stored in 16 bits
    assert_rel_close(dx.double(), dx_exact, tolerance)


@pytest.mark.parametrize(("device", "dtype"), DEVICES[:1] + DEVICES[2:3])
def test_deterministic_and_finite_at_extremes(device, dtype):
    """Bitwise the same twice; an expert no row picks (mean probability 0 in float32) and
    large logits give finite values and gradients equal to the plain expression's."""
    logits = _logits((2, 300, 6), device, dtype, seed=5, scale=30.0)
    with torch.no_grad():
        logits[..., 2] = -1000.0
    runs = []
    for _ in range(2):
        value = entropy_reg(logits, -2)
        (dx,) = torch.autograd.grad(value, logits)
        runs.append((value, dx))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    value, dx = runs[0]
    assert torch.isfinite(value) and torch.isfinite(dx).all()
    assert dx[..., 2].abs().max() == 0
    exact = logits.detach().double().requires_grad_()
    log_p = torch.log_softmax(exact, -1)  # the plain expression's form, finite here
    log_mean = log_p.logsumexp(-2) - math.log(exact.shape[-2])
    expected = (log_mean * log_mean.exp()).sum(-1).mean()
    (dx_exact,) = torch.autograd.grad(expected, exact)
    assert_rel_close(value.double(), expected, 1e-5)
    assert_rel_close(dx.double(), dx_exact, 1e-4)


@pytest.mark.parametrize(("device", "dtype"), DEVICES[:1] + DEVICES[2:3])
def test_plain_expression_where_the_kernels_do_not_apply(device, dtype, monkeypatch):
    """Averaging over the experts' own dim, float64 logits, and while compiling: the plain
    expression (no kernel launched)."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("the kernels ran")

    monkeypatch.setattr(entropy_triton, "forward", refuse)
    logits = _logits((3, 8, 5), device, dtype, seed=9)
    assert_rel_close(entropy_reg(logits, -1).double(), oracle(logits.detach(), -1), 1e-5)
    wide = logits.detach().double()  # (the plain expression computes in float32)
    assert_rel_close(entropy_reg(wide, 1).double(), oracle(wide, 1), 1e-5)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert_rel_close(entropy_reg(logits, 1).double(), oracle(logits.detach(), 1), 1e-5)


@pytest.mark.parametrize(("device", "dtype"), DEVICES[:1] + DEVICES[2:3])
def test_second_derivative_raises(device, dtype):
    logits = _logits((2, 9, 4), device, dtype, seed=3)
    value = entropy_reg(logits, -2)
    (dx,) = torch.autograd.grad(value, logits, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(dx.sum(), logits)


@pytest.mark.parametrize(("device", "dtype"), DEVICES[:1] + DEVICES[2:3])
def test_moeut_lm_regulariser_matches_the_plain_path(device, dtype, tiny_lm, monkeypatch):
    """A training forward's ``reg_loss`` and every parameter's gradient through it: the same
    with the kernels as with the plain expression."""
    model = tiny_lm(entropy_reg=0.5, att_entropy_reg=0.25).to(device).train()
    tokens = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))

    def reg_and_grads():
        model.zero_grad()
        reg = model(tokens.to(device)).reg_loss
        reg.backward()
        return reg.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    fused = reg_and_grads()
    monkeypatch.setattr("moeut.regularization._fused", lambda logits: False)
    plain = reg_and_grads()
    assert_rel_close(fused[0], plain[0], 1e-5)
    assert len(fused[1]) == len(plain[1]) > 0
    for a, b in zip(fused[1], plain[1]):
        assert_rel_close(a, b, 1e-4)
