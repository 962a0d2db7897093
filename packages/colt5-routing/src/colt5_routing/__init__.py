"""CoLT5 conditional routing: a differentiable coordinate-descent top-k router (Triton + reference)
and routed blocks.
"""

from importlib.metadata import PackageNotFoundError, version

from .attention import (
    Attention,
    ConditionalRoutedAttention,
    ConditionalRoutedAutoregressiveAttention,
    ConditionalRoutedCrossAttention,
)
from .coor_descent import TopkReturn, coor_descent, coor_descent_reference, topk
from .coor_descent_triton import triton_coor_descent
from .feedforward import ConditionalRoutedFeedForward, FeedForward
from .local_attention import LocalMHA, local_attention
from .router import CoordinateDescentRouter, RouterReturn
from .transformer import ConditionalRoutedTransformerBlock
from .vit import ConditionalRoutedImageAttention, ConditionalRoutedViT

try:
    __version__ = version("colt5-routing")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

__all__ = [
    "Attention",
    "ConditionalRoutedAttention",
    "ConditionalRoutedAutoregressiveAttention",
    "ConditionalRoutedCrossAttention",
    "ConditionalRoutedFeedForward",
    "ConditionalRoutedImageAttention",
    "ConditionalRoutedTransformerBlock",
    "ConditionalRoutedViT",
    "CoordinateDescentRouter",
    "FeedForward",
    "LocalMHA",
    "RouterReturn",
    "TopkReturn",
    "__version__",
    "coor_descent",
    "coor_descent_reference",
    "local_attention",
    "topk",
    "triton_coor_descent",
]
