"""Low-precision copies of master weights, made once per weight version.

Under autocast the MoE ops run their matmuls on bf16/fp16 copies of fp32 weights. Casting on
every call costs a full read and write of the weights each time; MoEUT applies each shared layer
several times per step (and again in the backward), so the copies are kept here, keyed on the
weight's identity and its ``_version`` counter: an optimizer step updates the weight in place,
which bumps the version, so the next call casts again. The cache holds the weight only weakly
and drops the copy when the weight is freed.
"""

from __future__ import annotations

import functools
import weakref

import torch

_CACHE: dict[int, tuple[weakref.ref, int, torch.dtype, torch.Tensor]] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _CACHE.get(key)
    if entry is not None and entry[0] is ref:
        del _CACHE[key]


def cast_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` in ``dtype``: the weight itself if it already is, else a cached detached copy
    (refreshed whenever the weight changed in place since the copy was made)."""
    if weight.dtype == dtype:
        return weight
    if (
        torch.compiler.is_compiling()
        or weight.is_inference()  # no version counter to key on
        or isinstance(weight, torch._subclasses.FakeTensor)
    ):
        return weight.detach().to(dtype)
    key = id(weight)
    entry = _CACHE.get(key)
    version = weight._version
    if entry is not None and entry[0]() is weight and entry[1] == version and entry[2] == dtype:
        return entry[3]
    copy = weight.detach().to(dtype)
    ref = weakref.ref(weight, functools.partial(_forget, key))
    _CACHE[key] = (ref, version, dtype, copy)
    return copy


def clear_weight_cache() -> None:
    """Drop every cached low-precision weight copy (they are rebuilt on the next call)."""
    _CACHE.clear()
