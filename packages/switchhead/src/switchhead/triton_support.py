"""Whether switchhead's Triton kernels can run for a tensor: the package's one such check
(DESIGN.md, "Optional Triton"); each kernel path adds its own limits on top."""

from __future__ import annotations

import functools
import os

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def _triton_imports() -> bool:
    try:  # Triton is optional off Linux
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernels_can_run(t: torch.Tensor) -> bool:
    """``t`` is on CUDA (or on the CPU under ``TRITON_INTERPRET=1``), of a 16/32-bit float dtype,
    and Triton imports."""
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return t.dtype in KERNEL_DTYPES and _triton_imports()
