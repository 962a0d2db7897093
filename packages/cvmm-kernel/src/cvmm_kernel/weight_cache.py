"""Low-precision copies of master weights, made once per weight version.

Under autocast the MoE ops run their matmuls on bf16/fp16 copies of fp32 weights. Casting on
every call costs a full read and write of the weights each time; MoEUT applies each shared layer
several times per step (and again in the backward), so the copies are kept here, keyed on the
weight's identity and its ``_version`` counter: an optimizer step updates the weight in place,
which bumps the version, so the next call casts again. Not every update bumps it: FSDP2 refills
its unsharded parameters under ``torch.autograd._unsafe_preserve_version_counter``, and writes
through ``.data`` are invisible to it. So a copy also serves forward calls only until a backward
pass has used the cache (a training step's weights change after its backward): the calls of one
forward share a copy, and the backward reuses it, but the next forward casts again. The cache
holds the weight only weakly and drops the copy when the weight is freed. While a CUDA graph is
captured, copies are kept apart and serve only that capture: the graph casts at every replay,
from the weights as they are then (one cast per weight per graph, as per step in eager mode).
Two graphs captured back to back with no call outside a capture between them share those copies
(as ``make_graphed_callables``' forward and backward graphs should: they replay in order).
"""

from __future__ import annotations

import functools
import weakref
from typing import NamedTuple

import torch

from .traced_ops import is_traced


class _Copy(NamedTuple):
    """A kept copy and what it was made from."""

    ref: weakref.ref  # the weight, weakly
    version: int  # the weight's version then
    dtype: torch.dtype
    pad_rows: int
    copy: torch.Tensor
    backward_calls: int  # _BACKWARD_CALLS then


_CACHE: dict[int, _Copy] = {}  # by id(weight)
# Calls made inside a backward pass so far: a copy made before the last one no longer serves
# a forward call (its weight may have changed without a new version since).
_BACKWARD_CALLS = [0]
# The copies made while a CUDA graph is captured (its memory pool's), for that capture only.
_CAPTURE_CACHE: dict[int, _Copy] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    for cache in (_CACHE, _CAPTURE_CACHE):
        entry = cache.get(key)
        if entry is not None and entry.ref is ref:
            del cache[key]


def _make(weight: torch.Tensor, dtype: torch.dtype, pad_rows: int) -> torch.Tensor:
    copy = weight.detach().to(dtype)
    if pad_rows:
        copy = torch.cat([copy, copy.new_zeros(pad_rows, *copy.shape[1:])])
    return copy


@torch.library.custom_op("cvmm_kernel::weight_in_dtype", mutates_args=())
def _weight_in_dtype(weight: torch.Tensor, dtype: torch.dtype, pad_rows: int) -> torch.Tensor:
    """The cast of a traced op body (:func:`cast_weight`), opaque to Inductor: it made the copy
    of a cast (a cheap pointwise node) afresh for every kernel that reads it, nine per step of
    each of MoEUT-244M's shared expert weights (4 of the compiled step's 51.6 ms on an H100,
    moeut's ``ab_compiled_graph_traced_ops.md``), where the graph's common-subexpression pass
    merges the calls of this op into one per weight."""
    return _make(weight, dtype, pad_rows)


@_weight_in_dtype.register_fake
def _(weight, dtype, pad_rows):
    return weight.new_empty(weight.shape[0] + pad_rows, *weight.shape[1:], dtype=dtype)


def cast_weight(weight: torch.Tensor, dtype: torch.dtype, pad_rows: int = 0) -> torch.Tensor:
    """``weight`` in ``dtype``: the weight itself if it already is, else a cached detached copy
    (made again when the weight changed in place since, and in a forward call after a backward
    has used the cache; see the module docstring). ``pad_rows``: the copy with that many rows of
    zeros appended along dim 0 (a copy then also where the dtype is the weight's)."""
    if weight.dtype == dtype and not pad_rows:
        return weight
    if is_traced(weight):  # fake or functional: a traced op body
        return _weight_in_dtype(weight, dtype, pad_rows)
    if torch.compiler.is_compiling() or weight.is_inference():  # (no version counter to key on)
        return _make(weight, dtype, pad_rows)
    # A copy made before a CUDA graph's capture would be read by every replay, stale once the
    # weight changes: while capturing, copies are made (and captured) apart from the others and
    # serve only that capture, so each replay casts the weights as they are then.
    capturing = weight.is_cuda and torch.cuda.is_current_stream_capturing()
    cache = _CAPTURE_CACHE if capturing else _CACHE
    if not capturing and _CAPTURE_CACHE:
        _CAPTURE_CACHE.clear()  # the capture has ended
    key = id(weight)
    entry = cache.get(key)
    version = weight._version
    in_backward = torch._C._current_graph_task_id() != -1
    if in_backward:
        _BACKWARD_CALLS[0] += 1
    if (
        entry is not None
        and entry.ref() is weight
        and entry.version == version
        and entry.dtype == dtype
        and entry.pad_rows == pad_rows
        and (in_backward or entry.backward_calls == _BACKWARD_CALLS[0])
    ):
        return entry.copy
    copy = _make(weight, dtype, pad_rows)
    ref = weakref.ref(weight, functools.partial(_forget, key))
    cache[key] = _Copy(ref, version, dtype, pad_rows, copy, _BACKWARD_CALLS[0])
    return copy


def clear_weight_cache() -> None:
    """Drop every cached low-precision weight copy (they are rebuilt on the next call)."""
    _CACHE.clear()
    _CAPTURE_CACHE.clear()
