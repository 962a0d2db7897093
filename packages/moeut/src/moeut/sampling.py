"""The next token from a language model's last logits: greedy, or sampled with a temperature
and an optional top-k cut (``MoEUTLM.generate``; also what the demo's CoLT5 model uses)."""

from __future__ import annotations

import torch


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``logits [B, V]`` (float) -> the next token ``[B, 1]`` int64.

    ``temperature == 0`` takes the most likely token; otherwise a token is drawn from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely ones if given
    (ties at the cut stay in). The maximum is shifted to 0 before dividing, so that a tiny
    temperature cannot overflow to ``inf``. Arguments are checked by the callers.
    """
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)
