"""SwitchHead mixture-of-experts attention (RoPE and Transformer-XL variants) with masks and an
explicit KV cache.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("switchhead")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

__all__ = ["__version__"]
