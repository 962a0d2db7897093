"""Input checks and the compute dtype / backend choice shared by ``moe_mlp`` and ``moe_linear``
(all raised on the host, before any kernel runs)."""

from __future__ import annotations

import torch

from .ops import Backend, resolve_backend
from .selection import _check_index_tensor
from .validation import check_backend_dtype


def check_routing_tensors(index: torch.Tensor, gate: torch.Tensor) -> None:
    """``index`` integer, ``gate`` floating point of the same shape."""
    _check_index_tensor(index)
    if gate.shape != index.shape:
        raise ValueError(
            f"gate must have index's shape {list(index.shape)}, got {list(gate.shape)}"
        )
    if not gate.dtype.is_floating_point:
        raise TypeError(f"gate must be a floating point tensor, got {gate.dtype}")


def check_one_device(op: str, *tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if tensors[0].device.type == "meta":
        raise ValueError(f"{op} cannot run on meta tensors")


def check_index_range(op: str, index: torch.Tensor, e: int, index_bound: int | None) -> None:
    """Expert indices in ``[0, e)``: on the host from ``index_bound`` when given, else read back
    (not while compiling)."""
    if index_bound is not None:
        if index_bound > e:
            raise ValueError(f"index_bound={index_bound} exceeds the number of experts {e}")
    elif index.numel() and not torch.compiler.is_compiling():
        if index.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ValueError(
                f"{op} cannot check the expert indices inside CUDA-graph capture (it would "
                "read them back): pass index_bound (e.g. the number of experts a top-k chose from)"
            )
        lo, hi = torch.aminmax(index)
        if int(lo) < 0 or int(hi) >= e:
            raise ValueError(f"expert indices must be in [0, {e}), got [{int(lo)}, {int(hi)}]")


def compute_dtype_and_backend(
    x: torch.Tensor, weight_dtype: torch.dtype, backend: Backend | None
) -> tuple[torch.Tensor, str]:
    """``x`` in the compute dtype (autocast's where enabled, else the weights' dtype, which it
    must have) and the backend: ``None`` falls back to the reference for dtypes the kernels do
    not take (e.g. float64); an explicit ``"triton"`` is refused clearly."""
    requested = backend
    backend = resolve_backend(x.device, backend)
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    elif x.dtype != weight_dtype:
        raise TypeError(
            f"x ({x.dtype}) and the weights ({weight_dtype}) must share a dtype outside autocast"
        )
    if requested is None and backend == "triton":
        try:
            check_backend_dtype(x.dtype, x.device, backend)
        except TypeError:  # e.g. float64: the automatic choice falls back to the reference
            backend = "reference"
    check_backend_dtype(x.dtype, x.device, backend)
    return x, backend
