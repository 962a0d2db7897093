"""Programmatic dependent launch (PDL) between consecutive kernels of one stream.

A kernel launched with ``launch_pdl=True`` may start while the kernel before it on the stream
is still running, once every program of that one has called :func:`gdc_launch_dependents` (or
exited); it must call :func:`gdc_wait` before it reads what the kernel before wrote, or writes
what that kernel reads. Each kernel that takes it does both first thing, so the only work that
overlaps is the launch itself and the programs' placement: the gap between two short kernels
(a routing's three launches). Hopper and later, Triton with grid dependency control (3.3+);
elsewhere both calls are no-ops and :func:`chained` is false. Used by this package's kernels;
not public API.
"""

from __future__ import annotations

import torch
import triton

from .interpreter import interpreting

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    AVAILABLE = True
except ImportError:  # Triton before 3.3
    AVAILABLE = False

    @triton.jit
    def _nothing():
        pass

    gdc_wait = gdc_launch_dependents = _nothing


# Set ENABLED[0] = False to launch every kernel after the one before it has finished.
ENABLED = [True]
_CAPABLE: dict[int, bool] = {}


def chained(device: torch.device) -> bool:
    """Whether launches on ``device`` may take PDL: CUDA with compute capability 9.0 or more,
    this Triton has it, not interpreting, and ``ENABLED``."""
    if not (ENABLED[0] and AVAILABLE and device.type == "cuda") or interpreting():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    capable = _CAPABLE.get(index)
    if capable is None:
        capable = _CAPABLE[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return capable
