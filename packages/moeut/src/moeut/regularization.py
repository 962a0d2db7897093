"""Entropy regularisation of expert selections (MoEUT): keep the average choice spread out."""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from switchhead.triton_support import kernels_can_run
from torch.autograd.function import once_differentiable


def entropy_reg(logits: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """Negative entropy of the mean selection distribution.

    Args:
        logits: raw selection logits ``[..., E]``; softmax is taken over the last dim.
        dim: the dim averaged over (tokens, and repeated applications of a shared layer).
        group: ``None``, or a ``torch.distributed`` process group: then the mean is taken over
            ``dim`` *and all dims before it* (the whole batch) on every rank of ``group`` (the
            authors' training code's "global" mode, ``log_mean(..., sync_distributed=True)``).
            Differentiable; every rank gets the same value, and with gradients averaged over
            the group (DDP/FSDP) training matches one process on the concatenated batch.

    Returns:
        ``-mean(H(mean_over_dim(softmax(logits))))``, a float32 scalar: minimising it spreads
        the average usage over the experts; exactly 0 when ``logits`` is empty.

    Without ``group``, 16/32-bit logits on CUDA (or on the CPU under ``TRITON_INTERPRET=1``)
    take one Triton pass each way (:mod:`moeut.entropy_triton`, deterministic; the same value
    and gradient up to float32 rounding); elsewhere, and while ``torch.compile`` traces, the
    plain expression.
    """
    if group is not None:
        return _global_entropy_reg(logits, dim, group)
    if _fused(logits):
        if not -logits.dim() <= dim < logits.dim():
            raise IndexError(f"dim {dim} is out of range for logits of shape {tuple(logits.shape)}")
        d = dim % logits.dim()
        if d != logits.dim() - 1:  # (averaging over the experts' dim: the plain expression)
            shape = logits.shape
            a, c = math.prod(shape[:d]), math.prod(shape[d + 1 : -1])
            return _FusedEntropy.apply(logits, (a, shape[d], c, shape[-1]))
    if logits.numel() == 0:
        # No tokens (T = 0 or B = 0): nothing to regularise. A zero that keeps the graph (the
        # authors' code raises "math domain error" for T = 0 and returns NaN for B = 0).
        return logits.float().sum()
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_mean = log_p.logsumexp(dim) - math.log(log_p.shape[dim])
    entropy = -(log_mean * log_mean.exp()).sum(-1)
    return -entropy.mean()


def _fused(logits: torch.Tensor) -> bool:
    """Whether :func:`entropy_reg` takes the Triton kernels (:mod:`moeut.entropy_triton`): CUDA
    (or the interpreter), 16/32-bit floats, not empty, at least 2-d, and not while compiling
    (Inductor fuses the plain expression). A second derivative through the kernels raises."""
    return (
        logits.numel() > 0
        and logits.dim() >= 2
        and not torch.compiler.is_compiling()
        and kernels_can_run(logits)
    )


@functools.cache
def _kernels():
    """:mod:`moeut.entropy_triton` (imports Triton: only where the kernels run; imported once,
    not at every call)."""
    from . import entropy_triton

    return entropy_triton


class _FusedEntropy(torch.autograd.Function):
    """:func:`entropy_reg` (``group=None``) in one pass over the logits each way."""

    @staticmethod
    def forward(ctx, logits, shape):
        x = logits.contiguous()
        value, m = _kernels().forward(x, shape)
        ctx.save_for_backward(x, m)
        ctx.shape = shape
        return value

    @staticmethod
    @once_differentiable  # the backward kernel records no graph: no silent second derivative
    def backward(ctx, grad):
        x, m = ctx.saved_tensors
        return _kernels().backward(x, m, grad, ctx.shape), None


def _global_entropy_reg(logits: torch.Tensor, dim: int, group) -> torch.Tensor:
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn

    dim = dim % logits.dim()
    flat = logits.float().flatten(0, dim)  # [N, ..., E]: the batch and the averaged dim
    with warnings.catch_warnings():  # deprecated for the functional collectives, which
        warnings.simplefilter("ignore", FutureWarning)  # are not differentiable in general
        total = dist_fn.all_reduce(F.softmax(flat, dim=-1).sum(0), group=group)
    count = torch.tensor(float(flat.shape[0]), device=flat.device)
    dist.all_reduce(count, group=group)
    # No tokens on any rank: the mean is 0 and so is the entropy below (no read-back: no sync).
    mean = total / count.clamp_min(1.0)
    entropy = -(mean * mean.clamp_min(torch.finfo(mean.dtype).tiny).log()).sum(-1)
    return -entropy.mean()
