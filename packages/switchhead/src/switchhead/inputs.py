"""The input checks every layer of this package and of moeut makes before computing: tensors,
floating point, on the parameters' device and, outside autocast, in the parameters' dtype."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def check_layer_inputs(tensors: Mapping[str, object], weight: torch.Tensor, what: str) -> None:
    """Raise for ``tensors`` (name -> input) that a layer with parameter ``weight`` cannot take.

    Args:
        tensors: the inputs by name (checked in order; the first non-tensor raises).
        weight: one of the layer's parameters (its device and dtype are the layer's).
        what: how the messages name the inputs, e.g. ``"q_src, k_src, v_src"``.

    Raises:
        TypeError: a non-tensor, a non-float input, or (outside autocast) an input of another
            dtype than the parameters'.
        ValueError: an input on another device than the parameters'.
    """
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    inputs: Mapping[str, torch.Tensor] = tensors  # type: ignore[assignment]  # checked above
    dtypes = {name: t.dtype for name, t in inputs.items()}
    if not all(d.is_floating_point for d in dtypes.values()):
        raise TypeError(f"{what} must be floating point, got {dtypes}")
    devices = {name: t.device for name, t in inputs.items()}
    if any(d != weight.device for d in devices.values()):
        raise ValueError(f"inputs must be on the parameters' device {weight.device}: {devices}")
    device = next(iter(inputs.values())).device
    autocast = device.type != "meta" and torch.is_autocast_enabled(device.type)  # not for meta
    if not autocast and any(d != weight.dtype for d in dtypes.values()):
        raise TypeError(
            f"outside autocast, {what} must have the parameters' dtype {weight.dtype}, got {dtypes}"
        )
