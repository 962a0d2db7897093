"""SwitchHead mixture-of-experts attention (RoPE and Transformer-XL variants) with masks and an
explicit KV cache.
"""

from importlib.metadata import PackageNotFoundError, version

from .attention import KVCache, SwitchHeadCore, SwitchHeadRope
from .block import SwitchHeadSelfAttention
from .masks import AttentionMask, causal_keep_mask, check_mask, sdpa_mask
from .relative_attention import relative_attention
from .rope import RotaryEmbedding
from .xl import SwitchHeadXL

try:
    __version__ = version("switchhead")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

__all__ = [
    "AttentionMask",
    "KVCache",
    "RotaryEmbedding",
    "SwitchHeadCore",
    "SwitchHeadRope",
    "SwitchHeadSelfAttention",
    "SwitchHeadXL",
    "__version__",
    "causal_keep_mask",
    "check_mask",
    "relative_attention",
    "sdpa_mask",
]
