"""MoEUT: a shared-layer universal transformer with sigma-MoE feedforward and SwitchHead
attention."""

from importlib.metadata import PackageNotFoundError, version

from switchhead import AttentionMask, SwitchHeadRope, SwitchHeadXL

from . import profiles
from .model import MoEUT, MoEUTLayer, MoEUTLM, MoEUTOutput
from .regularization import entropy_reg
from .sampling import sample_next_token
from .sigma_moe import SigmaMoE

try:
    __version__ = version("moeut")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

__all__ = [
    "AttentionMask",
    "MoEUT",
    "MoEUTLM",
    "MoEUTLayer",
    "MoEUTOutput",
    "SigmaMoE",
    "SwitchHeadRope",
    "SwitchHeadXL",
    "__version__",
    "entropy_reg",
    "profiles",
    "sample_next_token",
]
