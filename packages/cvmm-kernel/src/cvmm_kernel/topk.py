"""``topk_indices``: the experts a router picks, as one small Triton kernel on CUDA.

``torch.topk`` is slow at a router's shapes, many short rows (an H100 took 0.17 ms for 8192
rows of 387 with k = 16, and 56 us for 32768 rows of 10 with k = 2:
moeut/benchmarks/results/profile_MoEUT_244M.txt). Here one program ranks a block of rows held
in registers, picking the largest remaining score k times.

The order among equal scores is fixed: the lower index first (``torch.topk`` leaves it
unspecified); NaN ranks above every number, as in ``torch.topk``, so a NaN score is picked and
its gate propagates it. The indices come in rank order, largest first.
"""

from __future__ import annotations

import torch

from .interpreter import interpreting
from .traced_ops import triton_custom_op

# Rows wider than this go to torch.topk (the kernel holds a row block in registers).
MAX_WIDTH = 4096


def _use_triton(scores: torch.Tensor, k: int) -> bool:
    if scores.shape[-1] > MAX_WIDTH or scores.numel() == 0 or k == 0:
        return False
    return scores.device.type == "cuda" or interpreting()


def _topk_indices_triton(scores: torch.Tensor, k: int) -> torch.Tensor:
    from .topk_triton import launch_topk

    rows = scores.reshape(-1, scores.shape[-1])
    out = torch.empty(rows.shape[0], k, dtype=torch.int64, device=scores.device)
    launch_topk(rows, out)
    return out.view(*scores.shape[:-1], k)


@triton_custom_op("cvmm_kernel::topk_indices")
def _topk_indices_op(scores: torch.Tensor, k: int) -> torch.Tensor:
    return _topk_indices_triton(scores, k)


@_topk_indices_op.register_fake
def _(scores, k):
    return scores.new_empty(*scores.shape[:-1], k, dtype=torch.int64)


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries along the last dimension, largest first.

    Args:
        scores: ``[..., E]`` floating point (e.g. router scores; ``-inf`` hides an entry).
        k: ``0 <= k <= E``.

    Returns:
        ``[..., k]`` int64. Ties go to the lower index and NaN ranks first on the Triton path
        (CUDA, rows of at most ``MAX_WIDTH``); elsewhere this is ``torch.topk``'s choice.

    Raises:
        TypeError, ValueError: for a non-float ``scores`` or ``k`` out of range.
    """
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got {scores!r:.80}")
    if scores.dim() == 0 or not 0 <= k <= scores.shape[-1]:
        raise ValueError(
            f"k must be in [0, {scores.shape[-1] if scores.dim() else 0}] for scores of shape "
            f"{tuple(scores.shape)}, got {k}"
        )
    if not _use_triton(scores, k):
        return scores.topk(k, dim=-1, sorted=True).indices
    if torch.compiler.is_compiling():  # an opaque custom op with a fake implementation
        return _topk_indices_op(scores.detach(), k)
    # eager: the kernel directly (a custom-op call costs ~0.1 ms of host time, the kernel less)
    return _topk_indices_triton(scores.detach(), k)
