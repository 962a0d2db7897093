"""Attention masks: the upstream ``AttentionMask`` and its translation to SDPA arguments.

``AttentionMask`` uses the SwitchHead convention, ``True`` = *masked out*:

- ``position_mask``: ``[Tq, Tk]`` (or broadcastable ``[..., Tq, Tk]``); when the keys include a
  KV cache longer than the mask, the mask is padded on the left with "visible" columns;
- ``src_length_mask``: ``[B, Tk]``, e.g. padding.

Passing ``mask=None`` to an attention module means *causal*; ``AttentionMask()`` means no mask.
SDPA-style functions take the opposite convention (``True`` = keep).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMask:
    """Boolean masks, ``True`` = masked out; either may be ``None``."""

    position_mask: torch.Tensor | None = None
    src_length_mask: torch.Tensor | None = None


def causal_keep_mask(n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor:
    """``[Tq, Tk]`` bool, ``True`` = keep: query ``i`` sees keys ``<= i + (Tk - Tq)``.

    The queries are the last ``Tq`` positions of the ``Tk`` keys (bottom-right aligned), which is
    what incremental decoding with a KV cache needs.
    """
    q_pos = torch.arange(n_queries, device=device).unsqueeze(-1) + (n_keys - n_queries)
    return torch.arange(n_keys, device=device) <= q_pos


def sdpa_mask(
    mask: AttentionMask | None, batch: int, n_queries: int, n_keys: int, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """Translate a SwitchHead mask into SDPA's ``(attn_mask, is_causal)``.

    Returns a boolean keep-mask broadcastable to ``[B, H, Tq, Tk]`` (or ``None``) and whether to
    use SDPA's fused causal path. The default causal case with ``Tq == Tk`` never materialises a
    mask; with a KV cache (``Tq < Tk``) the causal mask is bottom-right aligned, and a single
    query needs no mask at all.
    """
    if mask is None:
        if n_queries == n_keys:
            return None, True
        if n_queries == 1:
            return None, False
        return causal_keep_mask(n_queries, n_keys, device), False
    masked = None
    if mask.position_mask is not None:
        pm = mask.position_mask
        if pm.dtype != torch.bool:
            raise TypeError(f"position_mask must be boolean (True = masked), got {pm.dtype}")
        if pm.shape[-2] != n_queries or pm.shape[-1] > n_keys:
            raise ValueError(
                f"position_mask must be [{n_queries}, <= {n_keys}], got {tuple(pm.shape)}"
            )
        if pm.shape[-1] < n_keys:
            pm = F.pad(pm, (n_keys - pm.shape[-1], 0), value=False)
        masked = pm
    if mask.src_length_mask is not None:
        sm = mask.src_length_mask
        if sm.dtype != torch.bool:
            raise TypeError(f"src_length_mask must be boolean (True = masked), got {sm.dtype}")
        if sm.shape != (batch, n_keys):
            raise ValueError(f"src_length_mask must be [{batch}, {n_keys}], got {tuple(sm.shape)}")
        sm = sm[:, None, None, :]
        masked = sm if masked is None else masked | sm
    if masked is None:
        return None, False
    return ~masked.to(device), False
