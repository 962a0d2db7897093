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


def row_alignment(channels: int, *tensors: torch.Tensor) -> int:
    """The largest of 8, 4, 2, 1 elements that divides ``channels`` and every tensor's base
    offset and first three strides (its leading, row-addressing dims): what a row kernel may
    assume of its row starts (``tl.multiple_of``), so that aligned rows move in vectors."""
    for align in (8, 4, 2, 1):
        if channels % align == 0 and all(
            t.storage_offset() % align == 0 and all(s % align == 0 for s in t.stride()[:3])
            for t in tensors
        ):
            return align
    return 1
