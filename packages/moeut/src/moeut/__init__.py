"""MoEUT: a shared-layer universal transformer with sigma-MoE feedforward and SwitchHead
attention."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moeut")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

__all__ = ["__version__"]
