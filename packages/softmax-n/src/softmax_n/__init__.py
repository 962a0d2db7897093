"""Attention with softmax_n (exp(x) / (n + sum exp(x))) for any real n, at flash-attention speed."""

from importlib.metadata import PackageNotFoundError, version

from .flash import flash_attention_n, softmax_n_attention_fn
from .flex import flex_attention_fn, flex_attention_n
from .functional import slow_attention_n, softmax_n
from .fused import flash_attention_n_triton

try:
    __version__ = version("softmax-n")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "flash_attention_n",
    "flash_attention_n_triton",
    "flex_attention_fn",
    "flex_attention_n",
    "slow_attention_n",
    "softmax_n",
    "softmax_n_attention_fn",
]
