"""Test helpers of cvmm-kernel: an independent einsum oracle and random problems."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch


@dataclass
class Problem:
    """A random CVMM problem with k selections per row and optional reduction weights."""

    x: torch.Tensor  # [*B, d_in]
    weights: torch.Tensor  # [E, d_in, d_out]
    sel: torch.Tensor  # [*B, k] int64
    reduction: torch.Tensor | None  # [*B, k] or None


def oracle(x: torch.Tensor, weights: torch.Tensor, sel: torch.Tensor, reduction=None):
    """out[..., j, :] = x[...] @ W[sel[..., j]] in float64 by gathering whole matrices."""
    x64, w64 = x.double(), weights.double()
    per_sel = torch.einsum("...d,...kde->...ke", x64, w64[sel])
    if reduction is None:
        return per_sel
    return torch.einsum("...k,...ke->...e", reduction.double(), per_sel)


def make_problem(
    batch: tuple[int, ...],
    k: int,
    n_experts: int,
    d_in: int,
    d_out: int,
    *,
    reduce: bool,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    generator: torch.Generator | None = None,
    experts_used: int | None = None,
) -> Problem:
    g = generator
    x = torch.randn(*batch, d_in, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(n_experts, d_in, d_out, generator=g) / d_in**0.5).to(
        device=device, dtype=dtype
    )
    high = n_experts if experts_used is None else experts_used
    sel = torch.randint(0, high, (*batch, k), generator=g).to(device)
    red = torch.rand(*batch, k, generator=g).to(device=device, dtype=dtype) if reduce else None
    return Problem(x, w, sel, red)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(name="oracle")
def oracle_fixture():
    return oracle


@pytest.fixture(name="make_problem")
def make_problem_fixture():
    return make_problem
