"""A layer's weights laid out as the one matrix its matmul takes, made once per weight version.

SwitchHead multiplies its input by q and k (heads padded to ``head_size``), both selections and
(dense path) every value expert in one matmul, and its output by every output expert's matrix.
Laying those matrices out on each forward (a pad per padded parameter, a transpose, a
concatenation, autocast's cast) costs small kernels and host time per call, and as many autograd
nodes in the backward: at d_head 100 the four pads took 0.4 ms of the eager T=1024 step's 6.6 ms
of profiled host Python (``benchmarks/results/profile_rope-4x4-d100_T1024.txt``, cProfile). Here
each matrix is made once per version of its parameters (an optimizer step or a load bumps the
versions) and compute dtype, and one autograd node per call maps the matrix's gradient back onto
the parameters (the layout's adjoint: slices, a transpose and one cast). While a CUDA graph is
captured the matrix is made every call, so that the graph lays it out from the weights at each
replay. Eager only: under ``torch.compile`` the layers lay the matrices out with plain ops, which
Inductor fuses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

Inverse = Callable[[torch.Tensor], torch.Tensor]


class Block(NamedTuple):
    """Rows of a prepared matrix: ``rows`` of them made from ``param`` by ``layout`` (no
    gradient), mapped back by ``inverse`` (a ``[rows, cols]`` gradient -> ``param``'s shape)."""

    param: torch.Tensor | None  # None: rows of zeros (padding)
    rows: int
    layout: Callable[[torch.Tensor], torch.Tensor]
    inverse: Inverse


class _Prepared(torch.autograd.Function):
    """Forward: a view of the kept matrix; backward: its gradient split into the blocks'
    parameters, in their dtype."""

    @staticmethod
    def forward(ctx, holder, blocks, *params):  # params: inputs for autograd only
        ctx.blocks = blocks
        matrix = holder[0]
        return matrix.view_as(matrix)

    @staticmethod
    def backward(ctx, grad):
        blocks = ctx.blocks
        dtype = next(b.param.dtype for b in blocks if b.param is not None)
        parts = grad.to(dtype).split([b.rows for b in blocks])
        grads = [b.inverse(part) for b, part in zip(blocks, parts) if b.param is not None]
        return None, None, *grads


def _compute_dtype(param: torch.Tensor) -> torch.dtype:
    """What autocast's matmul would cast ``param`` to (it leaves float64 alone), else its own."""
    device = param.device.type
    eligible = param.is_floating_point() and param.dtype != torch.float64
    if eligible and device != "meta" and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return param.dtype


def prepared_matrix(
    cache: dict[str, tuple[tuple, torch.Tensor]], name: str, blocks: Sequence[Block]
) -> torch.Tensor:
    """The matrix of ``blocks`` (rows concatenated, in the compute dtype: autocast's, else the
    parameters'), kept in ``cache[name]`` while the parameters keep their storage and version
    (not while a CUDA graph is captured); differentiable in the parameters."""
    params = [b.param for b in blocks if b.param is not None]
    first = params[0]
    dtype = _compute_dtype(first)
    key = (dtype, first.device, *[(id(p), p.data_ptr(), p._version) for p in params])
    # While a CUDA graph is captured, a kept matrix would be baked into the graph and go stale
    # when the weights change between replays: the layout is made (and captured) every call.
    capturing = first.is_cuda and torch.cuda.is_current_stream_capturing()
    entry = None if capturing else cache.get(name)
    if entry is None or entry[0] != key:
        with torch.no_grad():
            parts = [
                b.layout(b.param)
                if b.param is not None
                else first.new_zeros(b.rows, first.shape[-1])
                for b in blocks
            ]
            matrix = torch.cat(parts).to(dtype)  # a copy: never a view of a parameter
        entry = (key, matrix)
        if not capturing:
            cache[name] = entry
    matrix = entry[1]
    if not torch.is_grad_enabled() or not any(p.requires_grad for p in params):
        return matrix
    return _Prepared.apply([matrix], tuple(blocks), *params)
