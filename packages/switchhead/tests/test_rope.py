"""RotaryEmbedding: the Triton rotation (interpreter, GPU) and the PyTorch one against a float64
oracle written out per channel pair, forward and gradient, on strided views (the layer's
``[B, T, 2, H, hs]`` slice of its fused projection), with channels that are not rotated."""

from __future__ import annotations

import pytest
import torch
from switchhead import RotaryEmbedding

from testing_support import assert_rel_close


def oracle(x, n_rotate, base, offset, seq_dim):
    """float64: pair ``c`` with ``c + n_rotate / 2``, turned by ``position * base**(-2c/n)``."""
    x = x.double()
    d = seq_dim % x.dim()
    pos = (torch.arange(x.shape[d], device=x.device) + offset).double()
    shape = [1] * (x.dim() - 1)
    shape[d] = -1
    half = n_rotate // 2
    out = x.clone()
    for c in range(half):
        theta = (pos * base ** (-2 * c / n_rotate)).view(shape)
        a, b = x[..., c], x[..., c + half]
        out[..., c] = a * theta.cos() - b * theta.sin()
        out[..., c + half] = b * theta.cos() + a * theta.sin()
    return out


CASES = [  # shape of the fused output's view, seq_dim, n_rotate, head size, offset
    ((2, 9, 2, 3), 1, 6, 12, 0),  # [B, T, 2, H] x hs, half the channels rotated
    ((2, 9, 2, 3), 1, 20, 20, 5),  # every channel rotated, decoding offset
    ((7, 3), 0, 8, 104, 0),  # [T, H] x hs: SwitchHead's padded 100-channel head
    ((4, 5, 6), -2, 4, 6, 2),  # sequence dim counted from the back
]


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.interpret),
    pytest.param("cuda", marks=pytest.mark.gpu),
])  # fmt: skip
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_oracle(device, case):
    lead, seq_dim, n_rotate, hs, offset = case
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(*lead[:-1], lead[-1] * hs + 5, generator=g).to(device)
    x = wide[..., 2 : 2 + lead[-1] * hs].view(*lead, hs).detach().requires_grad_()
    rope = RotaryEmbedding(n_rotate, head_size=hs, backend="triton").to(device)
    out = rope(x, offset=offset, seq_dim=seq_dim)
    grad = torch.randn(out.shape, generator=g).to(device)
    (dx,) = torch.autograd.grad(out, x, grad)
    x64 = x.detach().cpu().double().requires_grad_()
    ref = oracle(x64, n_rotate, 10000.0, offset, seq_dim)
    (ref_dx,) = torch.autograd.grad(ref, x64, grad.cpu().double())
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert_rel_close(out.cpu(), ref, 1e-5, msg="out")
    assert_rel_close(dx.cpu(), ref_dx, 1e-5, msg="dx")


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_oracle(case):
    lead, seq_dim, n_rotate, hs, offset = case
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, hs, generator=g, dtype=torch.float64, requires_grad=True)
    rope = RotaryEmbedding(n_rotate, head_size=hs, backend="reference").double()
    out = rope(x, offset=offset, seq_dim=seq_dim)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (dx,) = torch.autograd.grad(out, x, grad)
    x64 = x.detach().clone().requires_grad_()
    ref = oracle(x64, n_rotate, 10000.0, offset, seq_dim)
    (ref_dx,) = torch.autograd.grad(ref, x64, grad)
    assert_rel_close(out, ref, 1e-12, msg="out")
    assert_rel_close(dx, ref_dx, 1e-12, msg="dx")


@pytest.mark.gpu
def test_bfloat16_kernel_within_tolerance():
    x = torch.randn(4, 256, 2, 4, 104, device="cuda").bfloat16().requires_grad_()
    rope = RotaryEmbedding(52, head_size=104).cuda()
    out = rope(x, offset=3, seq_dim=1)
    grad = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, grad)
    x64 = x.detach().double().requires_grad_()
    ref = oracle(x64, 52, 10000.0, 3, 1)
    (ref_dx,) = torch.autograd.grad(ref, x64, grad.double())
    assert out.dtype == torch.bfloat16
    assert_rel_close(out.double(), ref, 1e-2, msg="out")
    assert_rel_close(dx.double(), ref_dx, 1e-2, msg="dx")


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend must be"):
        RotaryEmbedding(4, backend="cuda")
