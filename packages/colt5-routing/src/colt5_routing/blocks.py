"""All CoLT5 blocks under one import path (kept for compatibility). Each family has its module:
:mod:`.feedforward`, :mod:`.attention`, :mod:`.vit` (image blocks) and :mod:`.transformer`; the
routed heavy branch they share is :mod:`.routed`."""

from __future__ import annotations

from .attention import (
    Attention,
    AttentionFn,  # noqa: F401 (importable from here before the split, not in __all__)
    ConditionalRoutedAttention,
    ConditionalRoutedAutoregressiveAttention,
    ConditionalRoutedCrossAttention,
)
from .feedforward import ConditionalRoutedFeedForward, FeedForward
from .transformer import ConditionalRoutedTransformerBlock
from .vit import ConditionalRoutedImageAttention

__all__ = [
    "Attention",
    "ConditionalRoutedAttention",
    "ConditionalRoutedAutoregressiveAttention",
    "ConditionalRoutedCrossAttention",
    "ConditionalRoutedFeedForward",
    "ConditionalRoutedImageAttention",
    "ConditionalRoutedTransformerBlock",
    "FeedForward",
]
