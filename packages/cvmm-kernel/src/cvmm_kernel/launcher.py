"""Triton kernel launches with less host time per call: ``launch(kernel, grid, *args)``.

``kernel[grid](...)`` binds and specialises every argument on each call (about 60 us per launch
of the GEMM kernel on the H100 host, measured: benchmarks/results/profile_moe.txt), which made an
eager forward + backward host-bound. ``launch`` keeps the compiled kernel of each argument
signature and calls it directly. The signature is what Triton specialises on: each tensor's
dtype and 16-byte alignment, and the exact value of every other argument (ints are specialised
on value ranges and divisibility; keying on the value is stricter). The first call of a
signature goes through ``kernel[grid]`` (compiling if needed) and returns its compiled kernel,
which later calls reuse.

Tensor descriptors (TMA) are encoded on the host at every launch by Triton's launcher (a driver
call and a pass over the arguments in Python: 9 us of the row-tile GEMM's 46 us per launch on
the H100 host in benchmarks/results/host_breakdown.md, 31 us in an earlier run). Where the
installed Triton's launcher has the layout this module knows (Triton 3.6's: checked, else the
plain path), the encoded form of each descriptor is kept, keyed on everything the encoding reads
(the base address, shape, strides and padding, and the kernel's block shape and swizzle through
the compiled kernel), and the launch goes to the compiled launcher's C entry point with the
encoded arguments. Kernels without descriptors go to that entry point too (the launcher
object's Python skipped).

Used by this package's kernels and by its sibling packages' (``switchhead``); not public API.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import torch

from .interpreter import interpreting
from .pdl import chained
from .traced_ops import is_traced, launch_traced

try:
    from triton.tools.tensor_descriptor import TensorDescriptor as _DESCRIPTOR

    DESCRIPTORS_AVAILABLE = True
except ImportError:  # Triton before 3.3

    class _DESCRIPTOR:  # type: ignore[no-redef]  # never made: isinstance is always false
        pass

    DESCRIPTORS_AVAILABLE = False


def _descriptor_defaults() -> dict[str, Any] | None:
    """The fields of this Triton's ``TensorDescriptor`` other than ``base``, ``shape``,
    ``strides`` and ``block_shape`` with their defaults, where it is a dataclass with those
    four fields and defaults for the rest (Triton 3.3-3.9), else None."""
    if not DESCRIPTORS_AVAILABLE or not dataclasses.is_dataclass(_DESCRIPTOR):
        return None
    fields = dataclasses.fields(_DESCRIPTOR)
    names = [f.name for f in fields]
    if names[:4] != ["base", "shape", "strides", "block_shape"]:
        return None
    rest = {f.name: f.default for f in fields[4:]}
    if dataclasses.MISSING in rest.values():
        return None
    return rest


_DESCRIPTOR_REST = _descriptor_defaults()


def descriptor(base: torch.Tensor, shape: list, strides: list, block_shape: list) -> Any:
    """``TensorDescriptor(base, shape, strides, block_shape)`` for arguments the caller has
    checked (16-byte aligned base and leading strides, last stride 1, power-of-two block):
    made without the dataclass's checks (about 10 us of host time per descriptor, several per
    eager MoE call) where its layout is known; with them under the interpreter (which the CPU
    tests run, so the checks see every shape the kernels are given) or where it is not."""
    if _DESCRIPTOR_REST is None or interpreting():
        return _DESCRIPTOR(base, shape, strides, block_shape)
    made = _DESCRIPTOR.__new__(_DESCRIPTOR)
    made.__dict__.update(_DESCRIPTOR_REST)
    made.base, made.shape, made.strides, made.block_shape = base, shape, strides, block_shape
    return made


_COMPILED: dict[tuple, tuple[Any, tuple | None, Any]] = {}  # compiled kernel, launcher, kept
_TAKES_PDL: dict[tuple[int, int], bool] = {}
# Set _FAST_LAUNCH[0] = False to launch through kernel[grid] every time (for debugging).
_FAST_LAUNCH = [True]
# Set KEEP_DESCRIPTORS[0] = False to launch through Triton's launcher object, which encodes the
# tensor descriptors at every launch (benchmarks/host_breakdown.py compares the two).
KEEP_DESCRIPTORS = [True]

_TENSOR = torch.Tensor


def _signature(kernel, device_index, args, options) -> tuple:
    """Key of a launch: per tensor its dtype and 16-byte alignment, per tensor descriptor its
    dtype and block shape (what the kernel is compiled for; its sizes and strides are passed at
    run time), every other argument as is, and the device. Called on every launch, so one
    comprehension over the arguments."""
    return (
        id(kernel),
        options,
        device_index,
        *[
            a  # most arguments: one set lookup instead of two isinstance calls
            if type(a) in _SCALARS
            else (a.dtype, not a.data_ptr() & 15)
            if isinstance(a, _TENSOR)
            else (a.base.dtype, *a.block_shape)
            if isinstance(a, _DESCRIPTOR)
            else a
            for a in args
        ],
    )


_SCALARS = frozenset({int, bool, float, str, type(None)})


def _launch_hooks():
    """Where this Triton keeps its launch hooks (``knobs.runtime`` from 3.4 on, the compiled
    kernel class before)."""
    try:
        from triton import knobs

        return knobs.runtime
    except ImportError:
        from triton.compiler.compiler import CompiledKernel

        return CompiledKernel


_HOOKS = _launch_hooks()


def _hooked() -> bool:
    """A launch hook is set (e.g. a Triton profiler): launch through Triton's own runner."""
    for hook in (_HOOKS.launch_enter_hook, _HOOKS.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):  # an empty hook chain: none
            return True
    return False


def _direct(compiled) -> tuple | None:
    """``(run, function, packed_metadata)`` of a compiled kernel whose handles are loaded: what
    Triton's runner passes to the launcher (``run(gx, gy, gz, stream, function, packed
    metadata, launch metadata, enter hook, exit hook, *args)`` in Triton 3.1-3.6), or None."""
    parts = tuple(getattr(compiled, name, None) for name in ("run", "function", "packed_metadata"))
    return parts if None not in parts else None


class _KeptDescriptors:
    """The C entry point of a compiled kernel's launcher and the encoded form of its tensor
    descriptor arguments, kept per descriptor (see the module docstring)."""

    __slots__ = ("encode", "encoded", "entry", "head", "metas", "positions")

    def __init__(self, entry, head, positions, metas, encode):
        self.entry, self.head, self.positions = entry, head, positions
        self.metas, self.encode = metas, encode
        self.encoded: dict[tuple, list] = {}

    def args(self, args: tuple) -> list:
        """``args`` with each descriptor replaced by its encoded arguments (``launch`` passes
        ``args`` as they are where there is none)."""
        out: list = []
        start = 0
        for position, meta in zip(self.positions, self.metas):
            d = args[position]
            key = (position, d.base.data_ptr(), *d.shape, *d.strides, d.padding)
            encoded = self.encoded.get(key)
            if encoded is None:
                if len(self.encoded) > 256:
                    self.encoded.clear()
                encoded = self.encoded[key] = self.encode(d, meta)
            out += args[start:position]
            out += encoded
            start = position + 1
        out += args[start:]
        return out


def _kept_descriptors(run, args: tuple) -> _KeptDescriptors | None:
    """A :class:`_KeptDescriptors` for a compiled kernel whose launcher ``run`` has Triton 3.6's
    layout (``CudaLauncher`` with a ``launch`` that encodes the descriptors of ``args`` through
    the driver's ``make_tensordesc_arg(arg, meta)`` and no scratch memory), else None."""
    if not KEEP_DESCRIPTORS[0]:
        return None
    if not any(isinstance(a, _DESCRIPTOR) for a in args):
        return _plain_entry(run)
    try:
        import inspect

        from triton.backends.nvidia import driver

        wrapped = run.launch
        cells = dict(
            zip(wrapped.__code__.co_freevars, (c.cell_contents for c in wrapped.__closure__))
        )
        entry, positions, metas = (
            cells["launcher"],
            sorted(cells["tensordesc_indices"]),
            cells["tensordesc_meta"],
        )
        encode = driver.make_tensordesc_arg
        base_len = driver._BASE_ARGS_FORMAT_LEN
        if (
            type(run).__name__ != "CudaLauncher"
            or wrapped.__name__ != "inner"
            or len(inspect.signature(encode).parameters) != 2
            or base_len != 13
            or run.global_scratch_size
            or run.profile_scratch_size
            or len(metas) != len(positions)
            or None in metas  # descriptors passed apart (no TMA): nothing to encode
            or [i for i, a in enumerate(args) if isinstance(a, _DESCRIPTOR)] != positions
        ):
            return None
        head = (run.launch_cooperative_grid, run.launch_pdl, None, None)
    except (AttributeError, ImportError, KeyError, TypeError, ValueError):
        return None
    return _KeptDescriptors(entry, head, positions, list(metas), encode)


def _plain_entry(run) -> _KeptDescriptors | None:
    """For a kernel without descriptor arguments whose launcher has Triton 3.6's layout and no
    scratch memory: its C entry point (``run.launch`` itself), called with the arguments
    ``CudaLauncher.__call__`` would pass, which skips that call's Python (its scratch
    allocation, none here): about 450 of an eager MoEUT step's launches. Else None."""
    try:
        from triton.backends.nvidia import driver

        entry = run.launch
        if (
            type(run).__name__ != "CudaLauncher"
            or not isinstance(entry, types.BuiltinFunctionType)
            or driver._BASE_ARGS_FORMAT_LEN != 13
            or run.global_scratch_size
            or run.profile_scratch_size
        ):
            return None
        head = (run.launch_cooperative_grid, run.launch_pdl, None, None)
    except (AttributeError, ImportError):
        return None
    return _KeptDescriptors(entry, head, [], [], None)


_MULTIPROCESSORS: dict[int, int] = {}


def multiprocessors(device: torch.device) -> int:
    """The CUDA ``device``'s multiprocessor count, looked up once per device (persistent grids
    size themselves by it at every launch; ``torch.cuda.get_device_properties`` costs a few us
    of host time a call)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = _MULTIPROCESSORS.get(index)
    if count is None:
        count = _MULTIPROCESSORS[index] = torch.cuda.get_device_properties(
            index
        ).multi_processor_count
    return count


def _takes_pdl(kernel, n_args: int) -> bool:
    """Whether ``kernel``'s last parameter is ``PDL`` and ``n_args`` arguments stop before it
    (:mod:`cvmm_kernel.pdl`)."""
    key = (id(kernel), n_args)
    takes = _TAKES_PDL.get(key)
    if takes is None:
        names: list[str] = list(getattr(kernel, "arg_names", ()))
        takes = _TAKES_PDL[key] = names[-1:] == ["PDL"] and n_args == len(names) - 1
    return takes


def launch(kernel, grid: tuple[int, ...], *args, num_warps: int = 4, num_stages: int = 3) -> None:
    """``kernel[grid](*args, num_warps=..., num_stages=...)`` with the argument binding cached
    (``args``: every kernel argument, constexprs included, in the kernel's order; the first
    one a tensor on the launch's device). A kernel whose last parameter is ``PDL``, not passed,
    gets ``pdl.chained(device)`` there and is launched as a programmatic dependent launch when
    that holds (:mod:`cvmm_kernel.pdl`).

    Later launches of a signature call the compiled kernel's launcher directly on the current
    stream, skipping the Python of Triton's runner (device and stream lookups, launch metadata,
    empty hook chains: about a third of a launch's host time), and with tensor descriptors
    their kept encoding; with a launch hook set they go through the runner. (An eager MoEUT
    step makes about 650 launches, so the common path calls no helper it can do without.)

    With a fake or functional first argument (the body of a triton_op traced by
    ``torch.compile``, :mod:`cvmm_kernel.traced_ops`) the launch is recorded for the compiled
    graph instead, not as a programmatic dependent launch."""
    first = args[0]
    device = first.device
    launch_pdl = False
    takes = _TAKES_PDL.get((id(kernel), len(args)))
    if takes is None:
        takes = _takes_pdl(kernel, len(args))
    if type(first) is not _TENSOR and is_traced(first):
        args = (*args, False) if takes else args
        launch_traced(kernel, grid, *args, num_warps=num_warps, num_stages=num_stages)
        return
    if takes:
        launch_pdl = chained(device)
        args = (*args, launch_pdl)
    if not _FAST_LAUNCH[0] or device.type != "cuda":
        options = {"launch_pdl": True} if launch_pdl else {}
        kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **options)
        return
    key = _signature(kernel, device.index, args, (num_warps, num_stages, launch_pdl))
    entry = _COMPILED.get(key)
    if entry is None:
        options = {"launch_pdl": True} if launch_pdl else {}
        compiled = kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **options)
        if len(_COMPILED) > 4096:
            _COMPILED.clear()
        if compiled is not None and hasattr(compiled, "__getitem__"):
            direct = _direct(compiled)
            kept = _kept_descriptors(direct[0], args) if direct is not None else None
            _COMPILED[key] = (compiled, direct, kept)
        return
    compiled, direct, kept = entry
    g0, g1, g2 = grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1
    hooks = _HOOKS
    hooked = hooks.launch_enter_hook is not None or hooks.launch_exit_hook is not None
    if direct is None or (hooked and _hooked()):
        compiled[(g0, g1, g2)](*args)
        return
    run, function, packed = direct
    stream = torch._C._cuda_getCurrentRawStream(device.index)
    if kept is not None and KEEP_DESCRIPTORS[0]:
        kept.entry(g0, g1, g2, stream, function, *kept.head, packed, None, None, None,
                   *(kept.args(args) if kept.positions else args))  # fmt: skip
        return
    run(g0, g1, g2, stream, function, packed, None, None, None, *args)
