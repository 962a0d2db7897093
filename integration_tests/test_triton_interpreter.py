"""The toolchain check behind every ``interpret`` test: a Triton kernel runs on CPU tensors."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.interpret


def test_triton_interpreter_runs_a_kernel_on_cpu(generator: torch.Generator) -> None:
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")

    @triton.jit
    def scaled_add(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        x = tl.load(x_ptr + offsets, mask=inside)
        y = tl.load(y_ptr + offsets, mask=inside)
        tl.store(out_ptr + offsets, x + alpha * y, mask=inside)

    n = 1000  # not a multiple of the block size: the tail is masked
    x = torch.randn(n, generator=generator)
    y = torch.randn(n, generator=generator)
    out = torch.full_like(x, float("nan"))
    scaled_add[(triton.cdiv(n, 128),)](x, y, out, n, 0.5, BLOCK=128)
    torch.testing.assert_close(out, x + 0.5 * y)
