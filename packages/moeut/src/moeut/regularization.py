"""Entropy regularisation of expert selections (MoEUT): keep the average choice spread out."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def entropy_reg(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """Negative entropy of the mean selection distribution.

    Args:
        logits: raw selection logits ``[..., E]``; softmax is taken over the last dim.
        dim: the dim averaged over (tokens, and repeated applications of a shared layer).

    Returns:
        ``-mean(H(mean_over_dim(softmax(logits))))``, a scalar: minimising it spreads the
        average usage over the experts; exactly 0 when ``logits`` is empty.
    """
    if logits.numel() == 0:
        # No tokens (T = 0 or B = 0): nothing to regularise. A zero that keeps the graph (the
        # authors' code raises "math domain error" for T = 0 and returns NaN for B = 0).
        return logits.float().sum()
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_mean = log_p.logsumexp(dim) - math.log(log_p.shape[dim])
    entropy = -(log_mean * log_mean.exp()).sum(-1)
    return -entropy.mean()
