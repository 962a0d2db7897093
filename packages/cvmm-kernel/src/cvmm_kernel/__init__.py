"""The CVMM op of sigma-MoE: per-row expert matrix multiply with Triton kernels on CUDA and a
PyTorch reference everywhere else.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cvmm-kernel")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

__all__ = ["__version__"]
