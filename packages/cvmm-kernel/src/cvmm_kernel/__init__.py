"""The CVMM op of sigma-MoE: per-row expert matrix multiply with Triton kernels on CUDA and a
PyTorch reference everywhere else.

``cvmm(x, sel, weights)`` multiplies each row of ``x`` by the matrix of ``weights`` that its
selection names; ``cvmm_prepare_sel2`` prepares k selections per row with optional weighted
reduction of the k results.
"""

from importlib.metadata import PackageNotFoundError, version

from .moe_linear import moe_linear
from .moe_mlp import moe_mlp
from .ops import cvmm
from .reference import cvmm_reference
from .router import sigmoid_topk
from .selection import (
    CVMMSel,
    cvmm_prepare_sel,
    cvmm_prepare_sel2,
    select_k_experts_per_row,
    select_one_expert_per_row,
)
from .shared_grads import accumulate_weight_grads
from .topk import topk_indices
from .weight_cache import clear_weight_cache

try:
    __version__ = version("cvmm-kernel")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

__all__ = [
    "CVMMSel",
    "__version__",
    "accumulate_weight_grads",
    "clear_weight_cache",
    "cvmm",
    "cvmm_prepare_sel",
    "cvmm_prepare_sel2",
    "cvmm_reference",
    "moe_linear",
    "moe_mlp",
    "select_k_experts_per_row",
    "select_one_expert_per_row",
    "sigmoid_topk",
    "topk_indices",
]
