"""Input checks shared by every CVMM path, run in Python before any kernel launches.

Index dtypes: the expert indices ``sel`` may be any of ``int64``, ``int32``, ``int16``, ``int8``
or ``uint8``, as long as the dtype can count the matrices (``expert_bounds`` searches the sorted
indices for ``0..n_matrices`` in their own dtype): ``int8`` addresses at most 127 matrices and
``uint8`` 255; beyond that ``cvmm`` refuses the dtype instead of silently wrapping around. Input
and output row indices (``sel_index``, ``out_index``) must be ``int64`` or ``int32``: PyTorch
reads a ``uint8`` index as a boolean mask and does not index with ``int8``/``int16`` at all. The
constructors ``cvmm_prepare_sel*`` always make them ``int64``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .interpreter import interpreting
from .selection import CVMMSel

# What x (after autocast) and weights may be: the dtypes a matmul of every path handles.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# What the Triton kernels multiply (fp32 accumulation; tl.dot has no float64 path we use).
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EXPERT_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
ROW_INDEX_DTYPES = (torch.int64, torch.int32)


_CAPABILITIES: dict[int | None, tuple[Any, tuple[int, ...]]] = {}


def _capability(device: torch.device) -> tuple[int, ...]:
    """The device's compute capability, looked up once per device (every op checks it) and
    again where the lookup function was replaced (tests simulate other GPUs). Keyed on the
    device index alone, and not read by code that Dynamo traces, which would guard on the dict's
    keys while the bodies of traced ops fill it during the compilation."""
    lookup = torch.cuda.get_device_capability
    if torch.compiler.is_compiling():
        return tuple(lookup(device))
    entry = _CAPABILITIES.get(device.index)
    if entry is None or entry[0] is not lookup:
        entry = _CAPABILITIES[device.index] = (lookup, tuple(lookup(device)))
    return entry[1]


def check_backend_dtype(dtype: torch.dtype, device: torch.device, backend: str | None) -> None:
    """Raise ``TypeError`` when ``backend`` cannot multiply ``dtype`` on ``device``.

    ``dtype`` is the dtype the kernels see: the autocast dtype under autocast, else ``x.dtype``.
    The Triton kernels handle float16, bfloat16 and float32; bfloat16 needs an Ampere or newer
    GPU (compute capability 8.0) and does not run under the Triton interpreter
    (``TRITON_INTERPRET=1``, whose NumPy arrays have no bfloat16). ``backend=None`` and
    ``"reference"`` accept every float dtype.
    """
    if backend is None or backend == "reference":
        return
    if backend != "triton":
        raise ValueError(f"unknown cvmm backend {backend!r}; use 'reference' or 'triton'")
    if dtype not in TRITON_DTYPES:
        raise TypeError(
            f"the Triton backend multiplies float16, bfloat16 and float32, not {dtype}; "
            "use backend='reference' for it"
        )
    if dtype != torch.bfloat16:
        return
    if device.type != "cuda" or interpreting():
        raise TypeError(
            "the Triton interpreter (TRITON_INTERPRET=1) cannot run bfloat16 kernels (NumPy has "
            "no bfloat16); use float32/float16 or backend='reference'"
        )
    capability = _capability(device)
    if capability < (8, 0):
        raise TypeError(
            f"bfloat16 Triton kernels need an Ampere or newer GPU (compute capability >= 8.0), "
            f"{device} has {capability[0]}.{capability[1]}; use float16 or backend='reference'"
        )


def check_cvmm_inputs(
    x: torch.Tensor, sel: CVMMSel, weights: torch.Tensor, *, backend: str | None = None
) -> int:
    """Raise a clear error for inputs that no path can multiply correctly.

    Checks dtypes, ranks, matching ``d_in``, devices, the sizes of the index tensors, the range
    of every index, that ``sel`` is sorted and that no output row is written twice. The value
    checks read one small tensor back from the device (a single synchronisation); they are
    skipped while ``torch.compile`` traces. Meta tensors and ``d_in == 0`` are refused.

    Selections made by ``cvmm_prepare_sel``/``cvmm_prepare_sel2`` (and not re-indexed by hand)
    have a known layout: for them only the expert range is read back (two values), or nothing
    at all when the constructor was given ``index_bound``.

    Args:
        backend: the resolved backend (``"reference"`` or ``"triton"``) whose dtype limits to
            check as well (see :func:`check_backend_dtype`); ``None`` checks only what every
            path needs.

    Returns:
        ``g > 0`` when input row ``== output row // g`` for every position (the layout of
        ``cvmm_prepare_sel``/``cvmm_prepare_sel2``, which makes the backward deterministic), else 0.
    """
    _check_operands(x, sel, weights)
    _check_devices(x, sel, weights)
    _check_index_dtypes(sel, weights.shape[0])
    autocast = torch.is_autocast_enabled(x.device.type)
    kernel_dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    check_backend_dtype(kernel_dtype, x.device, backend)
    n, n_rows = _check_sizes(x, sel)
    if n == 0 or torch.compiler.is_compiling():
        return 0
    if sel.layout_group and n == n_rows * sel.layout_group:
        return _check_constructed_range(sel, weights.shape[0])
    return _check_index_values(sel, n, n_rows, weights.shape[0])


def _check_operands(x: torch.Tensor, sel: CVMMSel, weights: torch.Tensor) -> None:
    """Types, float dtypes and ranks of the operands, and matching ``d_in``."""
    if not isinstance(x, torch.Tensor) or not isinstance(weights, torch.Tensor):
        raise TypeError("cvmm expects tensors for x and weights")
    if not isinstance(sel, CVMMSel):
        raise TypeError(f"sel must be a CVMMSel (see cvmm_prepare_sel*), got {type(sel).__name__}")
    if not x.dtype.is_floating_point or not weights.dtype.is_floating_point:
        raise TypeError(f"cvmm needs floating-point x and weights, got {x.dtype}, {weights.dtype}")
    for name, dtype in (("x", x.dtype), ("weights", weights.dtype)):
        if dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"cvmm multiplies float16, bfloat16, float32 and float64; {name} is {dtype}"
            )
    if weights.dim() != 3:
        raise ValueError(
            f"weights must be [n_matrices, d_in, d_out], got shape {tuple(weights.shape)}"
        )
    if x.dim() < 1 or x.shape[-1] != weights.shape[1]:
        raise ValueError(
            f"x's last dim ({x.shape[-1] if x.dim() else None}) must equal d_in of the weights "
            f"({weights.shape[1]})"
        )


def _check_devices(x: torch.Tensor, sel: CVMMSel, weights: torch.Tensor) -> None:
    """All tensors on one real (not meta) device, and ``d_in >= 1``."""
    tensors = {"x": x, "weights": weights, "sel": sel.sel, "sel_index": sel.sel_index}
    if sel.out_index is not None:
        tensors["out_index"] = sel.out_index
    if sel.reduction_weight is not None:
        tensors["reduction_weight"] = sel.reduction_weight
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"cvmm inputs must be on one device, got {devices}")
    if x.device.type == "meta":
        # The value checks, autocast and the reference path all need real tensors.
        raise ValueError("cvmm cannot run on meta tensors (no values); use a real device")
    if weights.shape[1] == 0:
        raise ValueError("cvmm needs d_in >= 1, got weights of shape [n, 0, d_out]")


def _check_index_dtypes(sel: CVMMSel, n_matrices: int) -> None:
    """Integer dtypes of the index tensors (see the module docstring), wide enough for
    ``n_matrices``."""
    for name, t in (("sel", sel.sel), ("sel_index", sel.sel_index), ("out_index", sel.out_index)):
        if t is None:
            continue
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
        allowed = EXPERT_INDEX_DTYPES if name == "sel" else ROW_INDEX_DTYPES
        if t.dtype not in allowed:
            raise TypeError(
                f"{name} must be an integer tensor of dtype "
                f"{', '.join(str(d).removeprefix('torch.') for d in allowed)}, got {t.dtype}"
            )
    if n_matrices > torch.iinfo(sel.sel.dtype).max:
        raise TypeError(
            f"expert indices (sel) of dtype {sel.sel.dtype} address at most "
            f"{torch.iinfo(sel.sel.dtype).max} matrices, but weights has {n_matrices}; "
            "convert them with .long()"
        )


def _check_sizes(x: torch.Tensor, sel: CVMMSel) -> tuple[int, int]:
    """Sizes of the index tensors and of ``reduction_weight``; returns the number of selections
    and the number of rows of ``x``."""
    n = sel.sel.numel()
    if sel.sel_index.numel() != n or (sel.out_index is not None and sel.out_index.numel() != n):
        raise ValueError(
            f"sel_index/out_index must have one entry per selection ({n}), got "
            f"{sel.sel_index.numel()} and "
            f"{None if sel.out_index is None else sel.out_index.numel()}"
        )
    w = sel.reduction_weight
    if w is not None:
        if w.numel() != n or w.dim() < 1:
            raise ValueError(
                f"reduction_weight must have one entry per selection ({n}), "
                f"got shape {tuple(w.shape)}"
            )
        if not w.dtype.is_floating_point:
            raise TypeError(f"reduction_weight must be floating point, got {w.dtype}")
    n_rows = math.prod(x.shape[:-1])
    if sel.out_index is None and n_rows != n:
        raise ValueError(
            f"without out_index, x must have one row per selection ({n}), got {n_rows} rows"
        )
    return n, n_rows


def _check_constructed_range(sel: CVMMSel, n_matrices: int) -> int:
    """The expert range of a selection with the constructors' layout (rows, outputs and order
    are right by construction); returns its ``layout_group``."""
    if sel.index_bound is not None:
        # Range promised by the constructor's caller: a host check, no synchronisation.
        if sel.index_bound > n_matrices:
            raise IndexError(
                f"expert index (sel) out of range: the selection allows indices up to "
                f"{sel.index_bound - 1}, but there are {n_matrices} matrices"
            )
        return sel.layout_group
    # Only the expert range is open: its two ends, read back at once.
    flat = sel.sel.flatten()
    lo, hi = torch.stack([flat[0], flat[-1]]).tolist()
    _check_range("expert index (sel)", lo, hi, n_matrices)
    return sel.layout_group


def _check_index_values(sel: CVMMSel, n: int, n_rows: int, n_matrices: int) -> int:
    """Ranges, order and uniqueness of the index values of any selection, read back in one
    synchronisation; returns the row group ``g`` (see ``check_cvmm_inputs``) or 0."""
    out_index = sel.sel_index if sel.out_index is None else sel.out_index
    group = n // n_rows if n_rows and n % n_rows == 0 else 0
    stats = [
        sel.sel.min(),
        sel.sel.max(),
        sel.sel_index.min(),
        sel.sel_index.max(),
        out_index.min(),
        out_index.max(),
        torch.bincount(out_index.flatten().clamp(0, n - 1), minlength=n).max(),
        (sel.sel.flatten()[1:] < sel.sel.flatten()[:-1]).any(),
    ]
    if group:
        stats.append((sel.sel_index == out_index // group).all())
    values = torch.stack([s.to(torch.int64) for s in stats]).tolist()
    _check_range("expert index (sel)", values[0], values[1], n_matrices)
    _check_range("input row index (sel_index)", values[2], values[3], n_rows)
    _check_range("output row index (out_index)", values[4], values[5], n)
    if values[6] > 1:
        raise ValueError("out_index must not repeat: each output row is written once")
    if values[7]:
        raise ValueError("sel must be sorted ascending (build selections with cvmm_prepare_sel*)")
    return group if group and values[8] else 0


def _check_range(what: str, lo: int, hi: int, size: int) -> None:
    if lo < 0 or hi >= size:
        raise IndexError(f"{what} out of range: values in [{lo}, {hi}], valid range [0, {size})")


# The launch settings of cvmm's kernels, passed per call as cvmm(..., config=).
CVMM_CONFIG_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


def check_launch_config(
    what: str, config: object, fields: Sequence[str], *, optional: int = 0
) -> tuple[int, ...]:
    """Launch settings passed per call (e.g. ``cvmm(..., config=)``), checked on the host before
    any kernel runs; returns them as a tuple of ints.

    ``config``: a sequence with one value per name of ``fields``, of which the last ``optional``
    may be left out. By name: ``BLOCK_*`` a power of two >= 16 (``tl.dot``'s smallest tile),
    ``num_warps`` a power of two from 1 to 32, ``num_stages`` >= 1, ``persistent`` a bool (or 0,
    1). ``TypeError`` for something else than a sequence of ints, ``ValueError`` for a wrong
    length or value; both name ``what`` and the field.
    """
    if isinstance(config, (str, bytes)) or not isinstance(config, Sequence):
        raise TypeError(f"{what} must be a tuple of ints {tuple(fields)}, got {config!r}")
    if not len(fields) - optional <= len(config) <= len(fields):
        raise ValueError(
            f"{what} must have {len(fields) - optional}"
            f"{f' or {len(fields)}' if optional else ''} values {tuple(fields)}, got {config!r}"
        )
    values = []
    for name, value in zip(fields, config):
        flag = name == "persistent"
        if not isinstance(value, int) or (isinstance(value, bool) and not flag):
            raise TypeError(f"{what}: {name} must be an int, got {value!r}")
        power_of_2 = value > 0 and not value & (value - 1)
        if name.startswith("BLOCK_"):
            ok, rule = power_of_2 and value >= 16, "a power of two >= 16"
        elif name == "num_warps":
            ok, rule = power_of_2 and value <= 32, "a power of two from 1 to 32"
        elif name == "num_stages":
            ok, rule = value >= 1, ">= 1"
        else:
            ok, rule = value in (0, 1), "a bool"
        if not ok:
            raise ValueError(f"{what}: {name} must be {rule}, got {value!r}")
        values.append(int(value))
    return tuple(values)
