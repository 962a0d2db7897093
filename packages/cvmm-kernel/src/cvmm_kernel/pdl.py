"""Programmatic dependent launch (PDL) between consecutive kernels of one stream.

A kernel launched with ``launch_pdl=True`` may start while the kernel before it on the stream
is still running, once every program of that one has called ``gdc_launch_dependents`` (or
exited); it must call ``gdc_wait`` before it reads what the kernel before wrote, or writes what
that kernel reads. A kernel takes part by ending its parameters with ``PDL: tl.constexpr =
False`` and calling :func:`wait_for_previous` first thing; ``launcher.launch`` then passes
``PDL`` and launches it that way where :func:`chained` holds. The work that overlaps is the
launch and the programs' placement only: the gap between two kernels (about 0.8 us each on an
H100: benchmarks/results/ab_routing_pdl_launches.md). Hopper and later, Triton with grid
dependency control (3.3+), a driver from CUDA 12.3 on (graphs capture the dependency);
elsewhere :func:`chained` is false. Not public API.
"""

from __future__ import annotations

import ctypes

import torch
import triton
import triton.language as tl

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


def driver_version() -> int:
    """The CUDA driver's version (``cuDriverGetVersion``, e.g. 12040 for 12.4), 0 where it
    cannot be read."""
    try:
        version = ctypes.c_int(0)
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) != 0:
            return 0
        return version.value
    except (OSError, AttributeError):
        return 0


# Drivers before CUDA 12.3 cannot capture a programmatic dependency into a CUDA graph.
MIN_DRIVER = 12030


def chained(device: torch.device) -> bool:
    """Whether launches on ``device`` may take PDL: CUDA with compute capability 9.0 or more and
    a driver from CUDA 12.3 on, this Triton has it, not interpreting, and ``ENABLED``."""
    if not (ENABLED[0] and AVAILABLE and device.type == "cuda") or interpreting():
        return False
    if torch.version.hip is not None:  # ROCm's "cuda" devices: no grid dependency control
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    capable = _CAPABLE.get(index)
    if capable is None:
        capable = _CAPABLE[index] = (
            torch.cuda.get_device_capability(index)[0] >= 9 and driver_version() >= MIN_DRIVER
        )
    return capable


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """With ``PDL``: wait until the kernel before has finished and its writes are visible, then
    let the kernel after launch (its programs then wait here in turn)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
