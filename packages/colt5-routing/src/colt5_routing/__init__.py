"""CoLT5 conditional routing: a differentiable coordinate-descent top-k router (Triton + reference)
and routed blocks.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("colt5-routing")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

__all__ = ["__version__"]
