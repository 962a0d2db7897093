"""SigmaMoE's selection logits (``x @ expert_sel^T`` through a padded, cached weight copy)
against float64 oracles: forward and both gradients, with and without autocast."""

from __future__ import annotations

import pytest
import torch
from moeut.sigma_moe import selection_logits


def _inputs(n_experts: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, 24, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(n_experts, 24, generator=g, dtype=dtype).requires_grad_()
    grad = torch.randn(2, 7, n_experts, generator=g, dtype=torch.float64)
    return x, w, grad


def _oracle(x, w, grad):
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    out = x64 @ w64.T
    out.backward(grad)
    return out.detach(), x64.grad, w64.grad


@pytest.mark.parametrize("n_experts", [1, 8, 13, 387])  # pads 7, 0, 3, 5 rows
def test_float64_matches_the_product(n_experts):
    x, w, grad = _inputs(n_experts, torch.float64)
    out = selection_logits(x, w)
    out.backward(grad)
    want, dx, dw = _oracle(x, w, grad)
    assert out.shape == (2, 7, n_experts) and out.dtype == torch.float64
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, dw, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_experts", [8, 387])
def test_autocast_bf16_matches_within_bf16(n_experts):
    """Under bf16 autocast (fp32 weights): bf16 logits as F.linear gives, gradients in the
    inputs' dtypes; errors within bf16 rounding of the operands (relative 2^-8 each, summed
    over 24 products)."""
    x, w, grad = _inputs(n_experts, torch.float32, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = selection_logits(x, w)
        linear = torch.nn.functional.linear(x, w)
    assert out.dtype == linear.dtype == torch.bfloat16
    out.float().backward(grad.float())
    want, dx, dw = _oracle(x, w, grad)
    assert x.grad.dtype == w.grad.dtype == torch.float32
    scale = lambda t: t.abs().max().item()
    assert (out.double() - want).abs().max() <= 0.03 * scale(want)
    assert (x.grad.double() - dx).abs().max() <= 0.03 * scale(dx)
    assert (w.grad.double() - dw).abs().max() <= 0.03 * scale(dw)


def test_autocast_follows_in_place_weight_updates():
    """The kept bf16 copy is made again after an optimizer-style in-place update."""
    x, w, _grad = _inputs(13, torch.float32, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = selection_logits(x, w)
        with torch.no_grad():
            w.mul_(-3.0)
        second = selection_logits(x, w)
    want = (x.detach().double() @ w.detach().double().T).float()
    torch.testing.assert_close(second.float(), want, rtol=0.03, atol=0.03 * want.abs().max().item())
    assert not torch.allclose(first.float(), second.float())


def test_uses_in_one_step_sum_their_gradients():
    """A weight applied twice (a shared MoEUT layer): its gradient is the sum of both uses'."""
    x, w, grad = _inputs(13, torch.float64, seed=3)
    y = x.detach().flip(0).requires_grad_()
    (selection_logits(x, w) * grad).sum().add((selection_logits(y, w) * grad).sum()).backward()
    want = (grad.flatten(0, 1).T @ x.detach().flatten(0, 1)) + (
        grad.flatten(0, 1).T @ y.detach().flatten(0, 1)
    )
    torch.testing.assert_close(w.grad, want, rtol=1e-12, atol=1e-12)


def test_frozen_weight_gets_no_gradient_and_x_still_does():
    x, w, grad = _inputs(13, torch.float64, seed=4)
    w.requires_grad_(False)
    selection_logits(x, w).backward(grad)
    _want, dx, _dw = _oracle(x, w, grad)
    assert w.grad is None
    torch.testing.assert_close(x.grad, dx, rtol=1e-12, atol=1e-12)
