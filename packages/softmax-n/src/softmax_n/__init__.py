"""Attention with softmax_n (exp(x) / (n + sum exp(x))) for any real n, at flash-attention speed,
with analysis and model surgery.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("softmax-n")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

__all__ = ["__version__"]
