"""Attention masks: the upstream ``AttentionMask`` and its translation to SDPA arguments.

``AttentionMask`` uses the SwitchHead convention, ``True`` = *masked out*. ``Tk`` is always the
number of keys attended to, i.e. the KV cache's keys plus the new ones.

- ``position_mask`` (bool), one of

  - ``[Tq, Tk]``: the same for every sequence and head;
  - ``[B, Tq, Tk]``: per sequence (``B`` may be 1), the same for every head;
  - ``[B, H, Tq, Tk]``: per sequence and head (``B`` and ``H`` may each be 1).

  Its last dim must be exactly ``Tk``: a mask narrower than the keys (e.g. one that leaves out
  the cached keys) is refused, not padded.
- ``src_length_mask`` (bool): ``[B, Tk]``, e.g. padding.
- ``causal``: ``True`` adds the causal mask (bottom-right aligned, so that it is right with a KV
  cache) to the other two; ``AttentionMask(src_length_mask=pad, causal=True)`` is causal
  attention over a padded batch. It needs ``Tq <= Tk``.

Passing ``mask=None`` to an attention module means *causal* (exactly
``AttentionMask(causal=True)``); ``AttentionMask()`` means no mask. Any other shape, a
non-boolean mask or causal masking with more queries than keys raises before anything is
computed. A query whose keys are all masked out gets a zero attention result (SDPA's behaviour).

SDPA-style functions take the opposite convention (``True`` = keep).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMask:
    """Boolean masks, ``True`` = masked out; either may be ``None``. ``causal=True`` adds the
    causal mask to them (see the module docstring for the accepted shapes)."""

    position_mask: torch.Tensor | None = None
    src_length_mask: torch.Tensor | None = None
    causal: bool = False


def causal_keep_mask(n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor:
    """``[Tq, Tk]`` bool, ``True`` = keep: query ``i`` sees keys ``<= i + (Tk - Tq)``.

    The queries are the last ``Tq`` positions of the ``Tk`` keys (bottom-right aligned), which is
    what incremental decoding with a KV cache needs. With ``Tq > Tk`` the first ``Tq - Tk`` rows
    keep nothing (the attention modules refuse that case).
    """
    q_pos = torch.arange(n_queries, device=device).unsqueeze(-1) + (n_keys - n_queries)
    return torch.arange(n_keys, device=device) <= q_pos


def _check_causal(n_queries: int, n_keys: int) -> None:
    if n_queries > n_keys:
        raise ValueError(
            f"causal attention (mask=None or causal=True) needs at least as many keys as queries "
            f"(keys include the KV cache), got Tq={n_queries} > Tk={n_keys}: the first "
            f"{n_queries - n_keys} queries would see no key. For cross-attention pass "
            "AttentionMask() or an explicit position_mask."
        )


def _check_bool(name: str, t: object, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a boolean tensor, got {type(t).__name__}")
    if t.dtype != torch.bool:
        raise TypeError(f"{name} must be boolean (True = masked), got {t.dtype}")
    if t.device.type == "meta" and device.type != "meta":
        raise ValueError(f"{name} is on the meta device but the attention inputs are on {device}")
    return t


def _position_mask_4d(
    pm: torch.Tensor, batch: int, n_heads: int | None, n_queries: int, n_keys: int
) -> torch.Tensor:
    """``pm`` as ``[B or 1, H or 1, Tq, Tk]``, or a ``ValueError`` naming the accepted shapes."""
    accepted = (
        f"position_mask must be [Tq, Tk], [B, Tq, Tk] or [B, H, Tq, Tk] with Tq={n_queries}, "
        f"Tk={n_keys} (keys include the KV cache), B in (1, {batch}), "
        f"H in (1, {'n_heads' if n_heads is None else n_heads}); got {tuple(pm.shape)}"
    )
    if pm.dim() not in (2, 3, 4) or tuple(pm.shape[-2:]) != (n_queries, n_keys):
        raise ValueError(accepted)
    if pm.dim() == 2:
        return pm.view(1, 1, n_queries, n_keys)
    if pm.shape[0] not in (1, batch):
        raise ValueError(accepted)
    if pm.dim() == 3:
        return pm.unsqueeze(1)
    if n_heads is not None and pm.shape[1] not in (1, n_heads):
        raise ValueError(accepted)
    return pm


def check_mask(
    mask: AttentionMask | None,
    batch: int,
    n_queries: int,
    n_keys: int,
    device: torch.device,
    n_heads: int | None = None,
) -> AttentionMask:
    """Validate ``mask`` for ``B=batch``, ``Tq``, ``Tk`` (and ``H`` when given) on the host,
    without computing anything; returns it with ``None`` made ``AttentionMask(causal=True)``.

    Raises:
        TypeError: a mask that is not a boolean tensor.
        ValueError: a mask of another shape, or causal masking with ``Tq > Tk``.
    """
    if mask is None:
        mask = AttentionMask(causal=True)
    if not isinstance(mask, AttentionMask):
        raise TypeError(f"mask must be an AttentionMask or None, got {type(mask).__name__}")
    if mask.causal:
        _check_causal(n_queries, n_keys)
    if mask.position_mask is not None:
        pm = _check_bool("position_mask", mask.position_mask, device)
        _position_mask_4d(pm, batch, n_heads, n_queries, n_keys)
    if mask.src_length_mask is not None:
        sm = _check_bool("src_length_mask", mask.src_length_mask, device)
        if tuple(sm.shape) != (batch, n_keys):
            raise ValueError(
                f"src_length_mask must be [B={batch}, Tk={n_keys}] (keys include the KV cache), "
                f"got {tuple(sm.shape)}"
            )
    return mask


def sdpa_mask(
    mask: AttentionMask | None,
    batch: int,
    n_queries: int,
    n_keys: int,
    device: torch.device,
    n_heads: int | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """Translate a SwitchHead mask into SDPA's ``(attn_mask, is_causal)``.

    Returns a boolean keep-mask of shape ``[B or 1, H or 1, Tq, Tk]`` (or ``None``) and whether
    to use SDPA's fused causal path. The causal case (``mask=None`` or only ``causal=True``) with
    ``Tq == Tk`` never materialises a mask; with a KV cache (``Tq < Tk``) the causal mask is
    bottom-right aligned, and a single query needs no mask at all.

    Args:
        mask: see the module docstring for the accepted shapes.
        batch, n_queries, n_keys: ``B``, ``Tq`` and ``Tk`` (``Tk`` includes cached keys).
        n_heads: ``H``, to check a ``[B, H, Tq, Tk]`` mask (not checked when ``None``).

    Raises:
        TypeError, ValueError: as :func:`check_mask`.
    """
    mask = check_mask(mask, batch, n_queries, n_keys, device, n_heads)
    masked = None
    if mask.position_mask is not None:
        masked = _position_mask_4d(mask.position_mask, batch, n_heads, n_queries, n_keys)
    if mask.src_length_mask is not None:
        sm = mask.src_length_mask[:, None, None, :]
        masked = sm if masked is None else masked.to(device) | sm.to(device)
    if masked is None:
        if not mask.causal:
            return None, False
        if n_queries == n_keys:
            return None, True
        if n_queries == 1:
            return None, False
        return causal_keep_mask(n_queries, n_keys, device).view(1, 1, n_queries, n_keys), False
    keep = ~masked.to(device)
    if mask.causal:
        keep = keep & causal_keep_mask(n_queries, n_keys, device)
    return keep, False
